"""Calibration and held-out data: text sources, tokenization, packing into fixed-length blocks.

The token stream of all documents (separated by EOS) is cut into blocks of ``seq_len`` tokens, each
starting the way the model's tokenizer starts a text (``block_start="tokenizer"``: its BOS token where it
adds one, nothing where it does not), so a model trained with BOS at position 0 is measured in the regime it
was trained in; ``block_start="none"`` cuts the raw stream (as cwa did before this option existed). The
last ``heldout_fraction`` of the blocks is the held-out split (used by ``cwa perturb``), fixed whatever the
seed, so runs with different calibration seeds are evaluated on the same text and no calibration block
ever overlaps it. ``num_samples`` calibration blocks are drawn by ``seed`` from
the rest.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cwa.common.errors import CwaError
from cwa.common.io import check_regular


class TextSource:
    """Base class of the places calibration text comes from."""

    def load(self) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class PydocCorpus(TextSource):
    """The English documentation topics that every CPython ships in ``pydoc_data.topics`` (offline)."""

    def load(self) -> list[str]:
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]

    def describe(self) -> str:
        return "pydoc_data.topics"


class TextFiles(TextSource):
    """Local files read with Hugging Face ``datasets``: ``.txt`` (one document per file),
    ``.json`` / ``.jsonl`` (one document per record) or ``.parquet``.

    Args:
        paths: file paths or glob patterns.
        text_field: the record field holding the text (JSON-lines and parquet).
    """

    def __init__(self, paths: list[str], text_field: str = "text") -> None:
        self.paths, self.text_field = list(paths), text_field

    def files(self) -> list[str]:
        found: list[str] = []
        for pattern in self.paths:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise CwaError(f"data file '{pattern}' does not exist.")
            for match in matches:
                if os.path.isdir(match):
                    raise CwaError(f"data path '{match}' is a directory; give its files (e.g. '{match}/*.txt').")
                if os.path.exists(match):  # a FIFO or a device would block or never end: refused before opening
                    check_regular(Path(match), os.stat(match), None, "data file")
            found.extend(matches)
        return found

    def load(self) -> list[str]:
        files = self.files()
        suffixes = {Path(f).suffix.lower() for f in files}
        builder = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
        kinds = {builder.get(s) for s in suffixes}
        if None in kinds or len(kinds) != 1:
            raise CwaError(f"data files must all be .txt, .jsonl/.json or .parquet, got {sorted(suffixes)}.")
        kind = kinds.pop()
        if kind == "text":
            return [t for t in (_read_text(f) for f in files) if t]
        return self._load_records(kind, files)

    def _load_records(self, kind: str, files: list[str]) -> list[str]:
        import datasets

        for file in files:  # pyarrow would only fail on non-UTF-8 text later, naming no file
            _check_readable(file, utf8=kind == "json")
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CwaError(f"cannot read the data files {', '.join(files)} as {kind}: {first}") from exc
        if self.text_field not in ds.column_names:
            raise CwaError(f"the data files have no field '{self.text_field}' (fields: {', '.join(ds.column_names)}).")
        return [t for t in ds[self.text_field] if t]

    def describe(self) -> str:
        return ",".join(self.paths)


def _read_text(file: str) -> str:
    """One document: the whole file, as UTF-8."""
    _check_readable(file, utf8=False)
    try:
        return Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(file, exc) from None


def _check_readable(file: str, utf8: bool) -> None:
    """One sentence naming ``file`` if it cannot be opened, or (``utf8``) is not UTF-8 text."""
    try:
        with open(file, "rb") as handle:
            if not utf8:
                return
            import codecs

            decoder = codecs.getincrementaldecoder("utf-8")()
            offset = 0
            while chunk := handle.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise _not_utf8(file, exc, offset) from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except OSError as exc:
        raise CwaError(f"cannot read data file '{file}': {exc.strerror or exc}.") from None


def _not_utf8(file: str, exc: UnicodeDecodeError, offset: int = 0) -> CwaError:
    return CwaError(
        f"data file '{file}' is not UTF-8 text (byte {offset + exc.start} is 0x{exc.object[exc.start]:02x}); "
        "convert it, e.g. `iconv -f latin1 -t utf-8`."
    )


class HubDataset(TextSource):
    """A dataset on the Hugging Face Hub (needs the hub, or its local cache).

    Args:
        name: dataset name, e.g. ``wikitext``.
        config: dataset configuration, e.g. ``wikitext-2-raw-v1``.
        split: which split to read.
        text_field: the column holding the text.
        max_documents: read at most this many documents (streaming), None for all.
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        max_documents: int | None = 20000,
    ) -> None:
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.max_documents = max_documents

    def load(self) -> list[str]:
        import datasets

        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
            texts = []
            for row in ds:
                if row.get(self.text_field):
                    texts.append(row[self.text_field])
                if self.max_documents and len(texts) >= self.max_documents:
                    break
        except Exception as exc:
            raise CwaError(
                f"cannot read dataset '{self.name}' from the Hugging Face Hub ({type(exc).__name__}); "
                "where the hub is unreachable, save the text to a local file and use TextFiles."
            ) from exc
        return texts

    def describe(self) -> str:
        return f"{self.name}/{self.config or ''}:{self.split}"


def as_source(source: TextSource | str | os.PathLike) -> TextSource:
    """``pydoc`` -> the embedded corpus; an existing path or glob -> TextFiles; otherwise a hub dataset."""
    if isinstance(source, TextSource):
        return source
    source = os.fspath(source)
    if source in ("pydoc", "pydoc_data", "embedded"):
        return PydocCorpus()
    if glob.glob(os.path.expanduser(source)):
        return TextFiles([source])
    if source.startswith((".", "/", "~")) or Path(source).suffix in (".txt", ".jsonl", ".json", ".parquet"):
        raise CwaError(f"data file '{source}' does not exist.")
    return HubDataset(source)


BlockStart = Literal["tokenizer", "none"]


def text_prefix(tokenizer) -> list[int]:
    """The token ids a tokenizer puts before a text by default (``[bos]`` for Gemma, Llama 2/3, Mistral;
    ``[]`` for GPT-2 or SmolLM2): its default encoding of a probe text minus the encoding without
    special tokens. Read from the tokenizer's behaviour, not from ``bos_token`` (many tokenizers define a
    BOS token they never add)."""
    probe = "The quick brown fox."
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    default = tokenizer(probe)["input_ids"]
    for start in range(len(default) - len(plain) + 1):
        if default[start : start + len(plain)] == plain:
            return list(default[:start])
    bos = tokenizer.bos_token_id  # the specials changed how the text itself tokenizes: keep a leading BOS only
    return [bos] if bos is not None and default[:1] == [bos] else []


def cut_blocks(stream: torch.Tensor, seq_len: int, prefix: list[int]) -> torch.Tensor:
    """(n, seq_len) blocks: ``prefix`` followed by the next ``seq_len - len(prefix)`` tokens of ``stream``;
    a last incomplete block is dropped."""
    content = seq_len - len(prefix)
    n_blocks = stream.numel() // content
    body = stream[: n_blocks * content].view(n_blocks, content)
    head = torch.tensor(prefix, dtype=stream.dtype).expand(n_blocks, len(prefix))
    return torch.cat([head, body], dim=1)


PAD_KEY = "cwa_pad"
"""Marks a filler batch: under sharding every rank must run the same number of steps (each forward and
backward is a collective), so ranks short of batches take part with a batch whose loss counts zero."""


class Blocks(Dataset):
    """Blocks by index; the index ``len(self)`` is the filler item (block 0 marked with ``PAD_KEY``)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i == len(self):
            return {"input_ids": self.blocks[0], PAD_KEY: torch.tensor(True)}
        return {"input_ids": self.blocks[i]}


class CalibrationData(L.LightningDataModule):
    """Calibration blocks for scoring and a disjoint held-out split for evaluation.

    Args:
        source: where the text comes from: ``pydoc`` (the embedded CPython documentation corpus), a
            local file path or glob (.txt / .jsonl / .parquet), a hub dataset name, or a ``TextSource``
            class (``class_path: cwa.fit.data.TextFiles``) with its options.
        tokenizer: tokenizer to load (set from ``model.pretrained`` by the CLI).
        seq_len: tokens per block.
        num_samples: calibration blocks to score on.
        batch_size: blocks per batch.
        heldout_fraction: share of the blocks (taken from the end of the corpus) kept for evaluation.
        heldout_samples: at most this many held-out blocks are evaluated (None: all).
        seed: seed for drawing the calibration blocks.
        num_workers: DataLoader worker processes.
        block_start: how each block starts: ``tokenizer`` with the tokens the tokenizer puts before a text
            by default (BOS for Gemma, Llama 2/3, Mistral; nothing for GPT-2, SmolLM2), ``none`` with the
            raw token stream (no special token; runs made before this option existed).
    """

    def __init__(
        self,
        # ``Path`` in the union is what makes jsonargparse treat a string as a path: with a class in the
        # union alone, it would read an existing file as a YAML config and pass on the file's text.
        source: TextSource | str | Path = "pydoc",
        tokenizer: str = "smollm2-135m",
        seq_len: int = 256,
        num_samples: int = 32,
        batch_size: int = 4,
        heldout_fraction: float = 0.1,
        heldout_samples: int | None = 64,
        seed: int = 0,
        num_workers: int = 0,
        block_start: BlockStart = "tokenizer",
    ) -> None:
        super().__init__()
        if block_start not in ("tokenizer", "none"):
            raise CwaError(f"block_start must be 'tokenizer' or 'none', got '{block_start}'.")
        for name, value in (("seq_len", seq_len), ("num_samples", num_samples), ("batch_size", batch_size)):
            if value < 1:
                raise CwaError(f"{name} must be at least 1, got {value}.")
        if seq_len < 2:
            raise CwaError("seq_len must be at least 2 (a block predicts its next tokens).")
        if not 0 <= heldout_fraction < 1:
            raise CwaError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}.")
        self.source = as_source(source)
        self.tokenizer_name = tokenizer
        self.seq_len, self.num_samples, self.batch_size = seq_len, num_samples, batch_size
        self.heldout_fraction, self.heldout_samples = heldout_fraction, heldout_samples
        self.seed, self.num_workers = seed, num_workers
        self.block_start = block_start
        self.prefix: list[int] = []
        self.calibration: torch.Tensor | None = None
        self.heldout: torch.Tensor | None = None
        self.corpus_tokens = 0

    # -- preparation ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.calibration is not None:
            return
        from cwa.fit.preflight import check_context
        from cwa.model.loading import load_tokenizer

        check_context(self.tokenizer_name, self.seq_len)  # before reading and tokenizing the corpus
        texts = self.source.load()
        if not texts or not any(t.strip() for t in texts):
            raise CwaError(f"the corpus {self.source.describe()} is empty.")
        tokenizer = load_tokenizer(self.tokenizer_name)
        self.prefix = text_prefix(tokenizer) if self.block_start == "tokenizer" else []
        if self.seq_len < len(self.prefix) + 2:
            raise CwaError(
                f"seq_len={self.seq_len} leaves no room for two tokens after the {len(self.prefix)} the "
                "tokenizer puts before a text; raise seq_len."
            )
        stream = tokenize_stream(texts, tokenizer)
        self.corpus_tokens = stream.numel()
        blocks = cut_blocks(stream, self.seq_len, self.prefix)
        n_blocks = blocks.shape[0]
        if n_blocks < 1:
            raise CwaError(
                f"the corpus {self.source.describe()} has {stream.numel()} tokens, fewer than one block of "
                f"seq_len={self.seq_len}; use more text or a shorter seq_len."
            )
        n_heldout = int(round(n_blocks * self.heldout_fraction))
        pool = n_blocks - n_heldout
        if self.num_samples > pool:
            raise CwaError(
                f"num_samples={self.num_samples} but the corpus {self.source.describe()} has only {pool} "
                f"calibration blocks of {self.seq_len} tokens (after holding out {n_heldout}); lower "
                "num_samples or seq_len, or add text."
            )
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(pool, generator=generator)[: self.num_samples].sort().values
        self.calibration = blocks[chosen].clone()
        heldout = blocks[pool:]
        if self.heldout_samples is not None:
            heldout = heldout[: self.heldout_samples]
        self.heldout = heldout.clone()
        self.calibration_indices = chosen

    def fingerprint(self, which: str = "calibration") -> str:
        """sha256 of the token ids of a split (first 16 hex digits)."""
        tensor = self.calibration if which == "calibration" else self.heldout
        if tensor is None:
            return ""
        return hashlib.sha256(tensor.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "source": self.source.describe(),
            "tokenizer": self.tokenizer_name,
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "block_start": self.block_start,
            "block_prefix": list(self.prefix),
            "corpus_tokens": self.corpus_tokens,
            "heldout_blocks": 0 if self.heldout is None else int(self.heldout.shape[0]),
            "calibration_fingerprint": self.fingerprint("calibration"),
            "heldout_fingerprint": self.fingerprint("heldout"),
        }

    # -- loaders -------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _sharded(self) -> bool:
        from cwa.fit.distributed import is_sharded_strategy

        trainer = getattr(self, "trainer", None)
        return trainer is not None and is_sharded_strategy(trainer.strategy)

    def _loader(self, blocks: torch.Tensor, equal_steps: bool = False) -> DataLoader:
        """Batches of ``batch_size`` consecutive blocks; in a distributed run rank r takes batches
        r, r + world, ... of the single-process batching, so every block is used exactly once (no
        sampler padding) and every batch is identical to the single-process run's. With ``equal_steps``
        (sharded models) ranks short of a batch get one filler batch (``PAD_KEY``) whose loss counts zero."""
        rank, world = self._rank_world()
        batches = [
            list(range(i, min(i + self.batch_size, len(blocks)))) for i in range(0, len(blocks), self.batch_size)
        ]
        mine = batches[rank::world]
        if equal_steps:
            mine += [[len(blocks)]] * (-(-len(batches) // world) - len(mine))
        return DataLoader(Blocks(blocks), batch_sampler=mine, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.calibration, equal_steps=self._sharded())

    def heldout_dataloader(self) -> DataLoader:
        self.setup()
        if self.heldout is None or self.heldout.shape[0] == 0:
            raise CwaError("the held-out split is empty; raise heldout_fraction or use a longer corpus.")
        return self._loader(self.heldout)


def tokenize_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents as one int64 token stream, each followed by the EOS token when there is one."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    pieces = []
    for doc in ids:
        pieces.append(torch.tensor(doc, dtype=torch.long))
        if eos is not None:
            pieces.append(torch.tensor([eos], dtype=torch.long))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
