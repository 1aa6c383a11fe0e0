"""An expert server's live assignment kept on disk (`--assignment-file`), so that it survives a
restart of the server together with the router.

A live placement change (router/rebalance.py) gives an expert server experts its topology entry
does not name. While the router runs, a restarted server is told them again when it registers
(expert_server/registration.py); a restarted router adopts what each live server reports holding.
When both restart, neither remembers: the server would come back with its topology entry's experts
and the moved ones would be lost until the next rebalance. With this file the server writes what it
holds after every change (load, drop, reassignment) and at start loads that instead of its topology
entry; its registration then reports them (holds_assignment) and the router adopts them. The router
(when it did not restart) still has the last word: it reassigns a server whose report differs.

The file is JSON: {"name", "replica_id", "model_fingerprint", "experts": [[layer, expert], ...]};
one that names another server, replica or checkpoint, or is unreadable, is ignored (with a
warning) and the topology entry's experts are loaded."""

import json
import logging
import os
import pathlib

from shardmesh.config import ModelConfig

log = logging.getLogger(__name__)
ExpertKeys = tuple[tuple[int, int], ...]


class AssignmentFile:
    def __init__(self, path: str | pathlib.Path, name: str, replica_id: str, model: ModelConfig):
        self.path, self.name, self.replica_id, self.model = pathlib.Path(path), name, replica_id, model

    def _identity(self) -> dict:
        return {"name": self.name, "replica_id": self.replica_id, "model_fingerprint": self.model.fingerprint}

    def read(self) -> ExpertKeys | None:
        """The experts recorded for this server, replica and checkpoint; None when there is no such record."""
        if not self.path.exists():
            return None
        try:
            record = json.loads(self.path.read_text())
            identity = {key: record[key] for key in self._identity()}
            experts = tuple(sorted((int(layer), int(expert)) for layer, expert in record["experts"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s: ignoring the assignment file %s: unreadable (%s)", self.name, self.path, error)
            return None
        if identity != self._identity():
            log.warning("%s: ignoring the assignment file %s: it records %s, not %s", self.name, self.path,
                        identity, self._identity())
            return None
        outside = [(l, e) for l, e in experts if not (0 <= l < self.model.num_layers and 0 <= e < self.model.num_experts)]
        if outside:
            log.warning("%s: ignoring the assignment file %s: experts %s are outside the model", self.name, self.path,
                        outside[:4])
            return None
        return experts

    def write(self, experts) -> None:
        """Record `experts` (what the server holds now); atomic: a crash leaves the old record or the new."""
        record = {**self._identity(), "experts": [list(key) for key in sorted(experts)]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)
