"""featurecache's jobs: `extract` (stage one) and the stage-two trainers, behind one CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featurecache")
except PackageNotFoundError:  # running from a checkout that was not pip-installed
    __version__ = "0+checkout"
