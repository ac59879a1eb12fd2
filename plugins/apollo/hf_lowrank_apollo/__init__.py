"""APOLLO for hf-lowrank-plugins: full fine-tuning, AdamW's moments of a random projection of each gradient
scale the raw gradient channel by channel (APOLLO) or as a whole (APOLLO-Mini)."""

from .config import ApolloConfig, ApolloMiniConfig
from .optimizer import ResumableApolloAdamW

__all__ = ["ApolloConfig", "ApolloMiniConfig", "ResumableApolloAdamW"]
