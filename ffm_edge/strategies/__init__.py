"""Training strategies, registered by name (see :mod:`ffm_edge.strategies.base`).

``lora`` (and QLoRA on an nf4 base), ``head``, ``prompt`` and ``full_q8``; optional backends (peft,
bitsandbytes) are imported only when a strategy prepares a model or builds its optimizer.
:mod:`.options` sets a strategy's config from ``KEY=VALUE`` text (``ffm-edge run --strategy-option``).
"""

from ffm_edge.strategies.base import (
    BASE_PRECISIONS,
    STRATEGIES,
    Strategy,
    StrategyConfig,
    get_strategy,
    head_module_names,
    register_strategy,
)
from ffm_edge.strategies.full_q8 import FullQ8Config, FullQ8Strategy, topk_sparsify
from ffm_edge.strategies.head import HeadConfig, HeadStrategy
from ffm_edge.strategies.lora import LoraConfig, LoraStrategy
from ffm_edge.strategies.options import (
    OptionField,
    format_strategy_options,
    parse_strategy_options,
    strategy_from_options,
    strategy_option_fields,
)
from ffm_edge.strategies.prompt import PromptConfig, PromptStrategy

__all__ = [
    "BASE_PRECISIONS",
    "STRATEGIES",
    "FullQ8Config",
    "FullQ8Strategy",
    "HeadConfig",
    "HeadStrategy",
    "LoraConfig",
    "LoraStrategy",
    "OptionField",
    "PromptConfig",
    "PromptStrategy",
    "Strategy",
    "StrategyConfig",
    "format_strategy_options",
    "get_strategy",
    "head_module_names",
    "parse_strategy_options",
    "register_strategy",
    "strategies_by_capability",
    "strategy_from_options",
    "strategy_option_fields",
    "topk_sparsify",
]


def strategies_by_capability() -> list[str]:
    """Registered strategy names, most capable first (what a planner tries in order)."""
    return sorted(STRATEGIES, key=lambda name: -STRATEGIES[name].capability_rank)
