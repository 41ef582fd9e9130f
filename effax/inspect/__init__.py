"""Looking at a model without running it: the one abstract run and what is built on it; see README.md here."""

from effax.inspect._abstract import abstract_mode, abstractly, run_abstractly
from effax.inspect._check import check_variables
from effax.inspect._diff import VariablesReport, diff_variables
from effax.inspect._inventory import Inventory, RequestRecord, effects_of
from effax.inspect._summary import Entry, Summary, entries_of, summary

__all__ = [
    "abstract_mode", "abstractly", "run_abstractly", "check_variables", "VariablesReport", "diff_variables",
    "RequestRecord", "Inventory", "effects_of", "Entry", "Summary", "entries_of", "summary",
]
