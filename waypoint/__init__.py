"""Waypoint: the opt-in L7 proxy (HTTP authorization, metrics, access logs)."""

from __future__ import annotations
