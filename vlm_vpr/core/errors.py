"""One root error for the library; each subclass says what went wrong and how to fix it."""

from __future__ import annotations


class VprError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(VprError):
    """A configuration value is out of range or of the wrong kind."""


class ImageError(VprError):
    """An image could not be decoded or has an unusable size or encoding."""


class NoFeaturesError(ImageError):
    """An image without a single usable local feature: blank, dark or textureless (a lens cap,
    darkness, a wall filling the view). ``reason``: the node's /diagnostics counter."""

    reason = 'no_features'


class MapError(VprError):
    """A map folder is missing, corrupt, of an unknown version or inconsistent."""


class IncompatibleMapError(MapError):
    """The map was built with another backbone or feature configuration than the query uses."""


class DatasetError(VprError):
    """A data set folder or protocol does not follow the shared data layout."""


class BagError(VprError):
    """A ROS bag cannot be read or lacks the topics asked for."""


class VlmError(VprError):
    """A vision-language model call failed: timeout, server error or unusable output."""


class VlmOutputError(VlmError):
    """The VLM answered, but not in the structure we asked for."""
