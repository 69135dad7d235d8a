"""Exception hierarchy for ctt."""


class CttError(Exception):
    """Base class of every error ctt raises on purpose."""


class ConfigError(CttError):
    """A configuration value is missing, of the wrong type, or out of range."""


class DataError(CttError):
    """A data set is missing, malformed or empty."""


class ModelError(CttError):
    """A model or tokenizer cannot be loaded or lacks something ctt needs."""


class TokenFileError(CttError):
    """A saved token file is missing, malformed, or does not fit the model."""
