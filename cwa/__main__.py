from cwa.cli import entrypoint

entrypoint()
