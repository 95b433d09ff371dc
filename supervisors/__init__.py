"""Process supervision trees: OTP strategies, intensity, backoff, liveness."""

from supervisors.child import ChildProcess
from supervisors.strategy import RestartPolicy
from supervisors.supervisor import Supervisor

__all__ = ["ChildProcess", "RestartPolicy", "Supervisor"]
