"""pdlab's one brain: pure-Python serving policies shared by the simulator and the real engine.

Imports neither torch nor simpy. Observations in, Decisions out.
"""
from .blocks import BlockPool, OutOfBlocks
from .config import (PRESETS, BackPressureConfig, FallbackConfig, PolicyConfig, RebalancerConfig, SchedulerConfig,
                     apply_overrides, load_policy_config)
from .controller import Controller
from .request import Request
from .scheduler import Batch, Scheduler
from .specs import HARDWARE, MODELS, HardwareSpec, ModelSpec, hardware_spec, model_spec
from .types import (DP, GPU0, GPU1, LINK, MODES, NO_SPLIT, PD, PIPELINE, SINGLE, Capabilities, DecisionRecord,
                    ErrorEvent, ModeDecision, Observation, SplitDecision, StepSample, ThrottleDecision, split_name)
from .backpressure import BackPressure
from .fallback import FallbackController
from .rebalancer import SmRebalancer
