"""Model classes souplm ships for layouts transformers has no class for (a CogVLM-style decoder)."""
