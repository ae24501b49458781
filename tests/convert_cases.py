"""For the ``espnet-mha-convert`` tests: the command line, and the temporary files a write leaves."""

from espnet_mha.convert import main


def run(*args):
    return main([str(a) for a in args])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
