"""Care transitions: encounter state from noisy ADT, the care team to tell, notifications
(deduplicated, retracted on cancels, digested by preference) and follow-up clocks.

Built as plugins on the routing engine: the ``encounter-state`` and ``care-team`` enrichers
and the ``notify`` step, configured in route YAML.
"""
