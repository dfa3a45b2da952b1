"""Typed messages that carry backend results from workers to the widgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message

from backends.models import Deployment, Run
from backends.workstation import InstanceListing


@dataclass
class InstancesLoaded(Message):
    listing: InstanceListing
    partial: bool = False  # more providers have yet to answer


@dataclass
class RunsLoaded(Message):
    runs: list[Run]
    errors: dict[str, str]  # teammate -> why their store could not be read
    view: Any = None  # backends.lineage.TeamLineage: runs, edges, annotations


@dataclass
class DeploymentsLoaded(Message):
    deployments: list[Deployment]
    errors: dict[str, str]


@dataclass
class MonitorUpdated(Message):
    idle: dict[str, float]  # run id -> mean GPU % of runs flagged idle

    def can_replace(self, message: Message) -> bool:  # a newer update supersedes a queued one
        return isinstance(message, MonitorUpdated)


@dataclass
class RunLaunched(Message):
    run: Run
