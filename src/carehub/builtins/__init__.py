"""carehub's own translators, enrichers and channels, registered exactly like third-party
plugins (each module here implements the registration hooks)."""

#: Modules loaded as built-in plugins, in this order.
BUILTIN_PLUGINS = [
    "carehub.builtins.core",
    "carehub.builtins.translators",
    "carehub.builtins.channels",
    "carehub.builtins.messaging",
    "carehub.builtins.care",
    "carehub.resources",
]
