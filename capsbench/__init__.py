"""capsbench: a benchmark suite for deep Capsule Networks (one namespace over suite/, models/, export/, reports/)."""

__version__ = "0.1.0"
