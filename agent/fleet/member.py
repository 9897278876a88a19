"""An agent as a fleet member: the MQTT link, its durable spool, and deploy/rollback of portfolios.

Deploy: stage (download, sha256, safe extraction, manifest, signature, health checks), point
`current` at it (keeping `previous`), then have the agent swap to it. If the agent refuses it,
the pointers go back and the agent keeps serving what it served. Rollback swaps the pointers
and the agent alike.
"""
from __future__ import annotations

import logging
from pathlib import Path

from agent.config import MqttConfig
from agent.fleet.commands import CommandError, CommandHandler
from agent.fleet.deploy import DeployError, DeployRequest, PortfolioStore
from agent.fleet.link import FleetLink
from agent.fleet.spool import Spool
from agent.portfolio import Portfolio
from agent.service import Agent

log = logging.getLogger("edgeshift.fleet")


class FleetMember:
    def __init__(self, agent: Agent, config: MqttConfig, state_dir: Path, store: PortfolioStore):
        self.agent = agent
        self.store = store
        self.spool = Spool(Path(state_dir) / "spool.sqlite")
        handlers = {"deploy": self.deploy, "rollback": self.rollback}
        self.link = FleetLink(agent, config, Path(state_dir), outbox=self.spool,
                              commands=CommandHandler(agent, handlers=handlers))

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()
        self.spool.close()

    def deploy(self, args: dict) -> dict:
        source, sha256, signature = args.get("source"), args.get("sha256"), args.get("signature")
        unknown = set(args) - {"source", "sha256", "signature"}
        if unknown or not isinstance(source, str) or not isinstance(sha256, str) or not (
                signature is None or isinstance(signature, str)):
            raise CommandError("deploy takes {\"source\": URL or path, \"sha256\": hex, \"signature\"?: str}")
        try:
            staged = self.store.stage(DeployRequest(source, sha256.lower(), signature))
            deployed = self.store.activate(staged)
        except DeployError as error:
            self.agent.emit("error", f"deploy refused: {error}", source=source)
            raise CommandError(f"deploy refused: {error}") from None
        return self._serve(deployed, f"deployed {deployed.name} ({deployed.digest[:12]}) from {source}", undo=True)

    def rollback(self, args: dict) -> dict:
        if args:
            raise CommandError("rollback takes no arguments")
        try:
            deployed = self.store.rollback()
        except DeployError as error:
            raise CommandError(str(error)) from None
        return self._serve(deployed, f"rolled back to {deployed.name} ({deployed.digest[:12]})", undo=True)

    def _serve(self, deployed, reason: str, undo: bool) -> dict:
        try:
            self.agent.replace_portfolio(Portfolio.open(deployed.path), reason)
        except Exception as error:  # the agent refused it: point back at what it still serves
            if undo:
                self.store.rollback()
            self.agent.emit("rollback", f"{deployed.name} refused by the agent ({error}); pointers restored",
                            portfolio=deployed.name)
            raise CommandError(f"the agent refused {deployed.name}: {error}; still serving {self.agent.name}") from None
        return {"portfolio": deployed.name, "digest": deployed.digest, "active": self.agent.active,
                "previous": deployed.previous.name if deployed.previous else None}
