"""couchsync: an organization's directory, kept identical in every instance of the organization."""

__version__ = "0.1.0"
