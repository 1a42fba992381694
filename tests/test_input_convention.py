"""The input convention: every block starts the way the tokenizer starts a text (cwa.fit.data).

The held-out perplexity cwa measures is checked against an independent computation that tokenizes each
held-out block's text with the tokenizer's *default* special tokens (``tokenizer(text)``) and sums the
next-token NLL with a hand-written loop, on a tokenizer that puts BOS before a text and on one that does not.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, tiny_llama

from cwa.common.errors import CwaError
from cwa.fit.data import CalibrationData, PydocCorpus, text_prefix
from cwa.perturb.evaluate import evaluate

SEQ_LEN = 24


@pytest.fixture(scope="module", params=[True, False], ids=["adds-bos", "no-bos"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("bos" if request.param else "nobos")
    tiny_llama(vocab_size=253, seed=1).save_pretrained(path)
    make_tokenizer(path, n_words=250, bos=request.param)
    return path, request.param


def _reference_perplexity(model, tokenizer, heldout_fraction: float, heldout_samples: int) -> tuple[float, int]:
    """Held-out perplexity from the tokenizer's defaults: the corpus as one stream of words and EOS, cut into
    pieces that leave room for the default special tokens, the held-out pieces' text re-encoded with
    ``tokenizer(text)`` (whatever it adds), and the NLL of every next token summed by hand."""
    specials = len(tokenizer("word")["input_ids"]) - len(tokenizer("word", add_special_tokens=False)["input_ids"])
    stream: list[int] = []
    for text in PydocCorpus().load():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    width = SEQ_LEN - specials
    pieces = [stream[i : i + width] for i in range(0, len(stream) - width + 1, width)]
    heldout = pieces[len(pieces) - round(len(pieces) * heldout_fraction) :][:heldout_samples]
    total, count = 0.0, 0
    with torch.no_grad():
        for piece in heldout:
            ids = tokenizer(tokenizer.decode(piece))["input_ids"]
            assert len(ids) == SEQ_LEN  # the word-level tokenizer round-trips its own text
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            for t in range(len(ids) - 1):
                total -= float(F.log_softmax(logits[t].double(), -1)[ids[t + 1]])
                count += 1
    return math.exp(total / count), len(heldout)


def test_heldout_perplexity_matches_the_tokenizers_defaults(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, adds_bos = model_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    settings = {"tokenizer": str(path), "seq_len": SEQ_LEN, "num_samples": 4, "heldout_samples": 12}
    data = CalibrationData(**settings)
    data.setup()
    assert data.prefix == ([2] if adds_bos else [])
    assert data.describe()["block_start"] == "tokenizer" and data.describe()["block_prefix"] == data.prefix
    starts = torch.cat([data.calibration[:, 0], data.heldout[:, 0]])
    assert bool((starts == 2).all()) == adds_bos

    measured = evaluate(model, data.heldout, 5, torch.device("cpu")).perplexity
    reference, blocks = _reference_perplexity(model, tokenizer, data.heldout_fraction, 12)
    assert blocks == data.heldout.shape[0] == 12
    assert measured == pytest.approx(reference, rel=1e-5)

    raw = CalibrationData(**settings, block_start="none")
    raw.setup()
    assert raw.prefix == []
    if adds_bos:  # the test can fail: the raw stream is another measurement on this tokenizer
        assert not bool((raw.heldout == 2).any())
        assert evaluate(model, raw.heldout, 5, torch.device("cpu")).perplexity != pytest.approx(reference, rel=1e-3)
    else:
        assert torch.equal(raw.heldout, data.heldout)


def test_prefix_is_read_from_the_tokenizers_behaviour(tmp_path):
    with_bos = make_tokenizer(tmp_path / "a", bos=True)
    without = make_tokenizer(tmp_path / "b")
    assert text_prefix(with_bos) == [2] and text_prefix(without) == []
    without.bos_token = "<eos>"  # a BOS token the tokenizer never adds is not a prefix
    assert text_prefix(without) == []


def test_block_start_errors(model_dir):
    path, adds_bos = model_dir
    with pytest.raises(CwaError, match="block_start must be"):
        CalibrationData(tokenizer=str(path), block_start="always")
    if adds_bos:
        with pytest.raises(CwaError, match="leaves no room"):
            CalibrationData(tokenizer=str(path), seq_len=2, num_samples=1).setup()


@pytest.mark.parametrize("block_start", ["tokenizer", "none"])
def test_lm_eval_encodes_items_the_way_blocks_start(model_dir, block_start):
    """lm-eval's HFLM, built as cwa builds it, starts a text with BOS exactly when the run's blocks do."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from cwa.perturb.downstream import DownstreamTasks

    path, adds_bos = model_dir
    data = CalibrationData(tokenizer=str(path), seq_len=SEQ_LEN, num_samples=4, block_start=block_start)
    data.setup()
    tasks = DownstreamTasks(["cwa_pydoc_lastword"], limit=2)
    tasks.setup(data)
    try:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        lm = HFLM(pretrained=model, tokenizer=tasks.tokenizer, batch_size=1, add_bos_token=tasks.add_bos_token)
        encoded = lm.tok_encode("the")
        word = tasks.tokenizer("the", add_special_tokens=False)["input_ids"]
        assert len(word) == 1
        assert encoded == ([2] + word if adds_bos and block_start == "tokenizer" else word)
    finally:
        tasks.close()


def test_a_run_is_reevaluated_on_its_own_blocks(model_dir, tmp_path):
    """perturb rebuilds a run's held-out split from its config.yaml: with the run's block_start, and for a run
    made before the setting existed (no block_start in its config), on the raw stream as it was scored."""
    import yaml

    from cwa.cli import main
    from cwa.perturb.run_data import build_data
    from cwa.rundir import Run

    path, adds_bos = model_dir
    args = ["fit-sensitivity", f"--model.pretrained={path}", "--model.metric=magnitude", "--model.k=3"]
    args += [f"--data.seq_len={SEQ_LEN}", "--data.num_samples=2", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main([*args, "--trainer.logger.init_args.name=bos", "--trainer.enable_progress_bar=false"]) == 0
    run_dir = tmp_path / "bos" / "version_0"
    expected = CalibrationData(tokenizer=str(path), seq_len=SEQ_LEN, num_samples=2)
    expected.setup()
    assert torch.equal(build_data(Run.load(run_dir)).heldout, expected.heldout)

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"].pop("block_start") == "tokenizer"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    raw = CalibrationData(tokenizer=str(path), seq_len=SEQ_LEN, num_samples=2, block_start="none")
    raw.setup()
    rebuilt = build_data(Run.load(run_dir)).heldout
    assert torch.equal(rebuilt, raw.heldout) and torch.equal(rebuilt, expected.heldout) == (not adds_bos)
