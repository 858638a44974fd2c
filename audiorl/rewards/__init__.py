"""ASR rewards (inspired by Fun-ASR's RL stage) and their weighted composition.

Every reward has TRL's reward-function signature: it takes the completions (transcripts) and the
dataset columns of their records as keyword arguments, and returns one float per completion, or
None where it does not apply (a hotword reward for a record without hotwords).
"""

from audiorl.rewards.asr import REWARDS, cer, hallucination, hotword, language, length, wer
from audiorl.rewards.compose import ComposedReward, RewardSpec, build_reward

__all__ = [
    "REWARDS",
    "ComposedReward",
    "RewardSpec",
    "build_reward",
    "cer",
    "hallucination",
    "hotword",
    "language",
    "length",
    "wer",
]
