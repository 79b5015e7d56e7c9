"""dgemma: run, serve and fine-tune DiffusionGemma block-diffusion language models."""


def __getattr__(name: str):
    # __version__ is looked up on demand: importlib.metadata is not free, and `import dgemma` should be
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("dgemma")
        except PackageNotFoundError:  # a checkout that was never installed
            return "0+unknown"
    raise AttributeError(f"module 'dgemma' has no attribute {name!r}")
