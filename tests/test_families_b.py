"""Train, merge, export and chat on tiny models of the second half of the families (family_tests.py)."""

from family_tests import family_tests
from families import FAMILIES

globals().update(family_tests([f.name for f in FAMILIES[len(FAMILIES) // 2:]]))
