"""The telemetry hub: agents stream node reports in, commands go out (see ``hub``)."""

from controller.telemetry.auth import Identity, StaticTokenAuthenticator, TokenReviewAuthenticator
from controller.telemetry.hub import HubConfig, TelemetryHub
from controller.telemetry.port import HubAgentPort
from controller.telemetry.server import start_server
from controller.telemetry.summary import TelemetrySummary, summarise

__all__ = [
    "HubAgentPort",
    "HubConfig",
    "Identity",
    "StaticTokenAuthenticator",
    "TelemetryHub",
    "TelemetrySummary",
    "TokenReviewAuthenticator",
    "start_server",
    "summarise",
]
