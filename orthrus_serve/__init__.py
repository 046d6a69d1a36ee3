"""orthrus-serve: the serving layer (gRPC + OpenAI HTTP on Ray Serve) over orthrus-engines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("orthrus-serve")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
