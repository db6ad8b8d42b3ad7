"""The old import path of the process group and its byte counter: ``scopes/group.py``."""

from .scopes.group import Group, check_whole_world, count_bytes

__all__ = ["Group", "check_whole_world", "count_bytes"]
