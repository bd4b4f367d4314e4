"""The durable message store: every message, its header facts and its status history."""

from carehub.store.schema import MessageStatus
from carehub.store.store import MessageStore, NewMessage, StoredMessage

__all__ = ["MessageStatus", "MessageStore", "NewMessage", "StoredMessage"]
