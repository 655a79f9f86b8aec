"""Why a store entry cannot be served. Each message tells the operator what to do."""


class StoreError(Exception):
    """A store entry is unusable; the message says why and how to fix it."""


class UnknownModel(StoreError):
    pass


class ManifestInvalid(StoreError):
    pass


class WeightsMissing(StoreError):
    pass


class WeightsCorrupt(StoreError):
    """Checksum mismatch, unreadable file, or tensors that do not fit the architecture."""
