"""Test helpers shipped with hf_sift: a local Hugging Face Hub (`hub_server`) and its pytest plugin."""

from .hub_server import Fault, HubServer, RequestRecord


__all__ = ["Fault", "HubServer", "RequestRecord"]
