"""FunctionalNetworksSFT: supervised fine-tuning of causal language models you can trust."""

__version__ = "0.1.0"
