"""One request's life as the scheduler sees it, plus the timestamps requests.csv records."""
from __future__ import annotations

WAITING, PENDING_TRANSFER, TRANSFERRING, READY, RUNNING = "waiting", "pending_transfer", "transferring", "ready", "running"
FINISHED, FAILED, REJECTED = "finished", "failed", "rejected"
DONE = (FINISHED, FAILED, REJECTED)


class Request:
    """Token counts, KV placement and timestamps of one request (nano-vllm's Sequence, for two GPUs).

    kv_len counts tokens whose KV is in the cache: after a prefill it is the prompt (plus tokens
    generated before a preemption) and the token just sampled is not yet in it.
    """

    __slots__ = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "generated", "kv_len",
                 "prefilled", "prefill_target", "prefill_device", "decode_device", "kv_device", "blocks",
                 "dst_blocks", "state", "mode", "preemptions", "transfer_attempts", "prefill_start_s",
                 "prefill_end_s", "kv_transfer_start_s", "kv_transfer_end_s", "first_token_s", "finish_s",
                 "fail_reason", "token_ids", "stop_requested")

    def __init__(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int):
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.generated = 0
        self.kv_len = 0
        self.prefilled = 0
        self.prefill_target = prompt_tokens
        self.prefill_device = ""
        self.decode_device = ""
        self.kv_device = ""
        self.blocks: list[int] = []
        self.dst_blocks: list[int] = []
        self.state = WAITING
        self.mode = ""
        self.preemptions = 0
        self.transfer_attempts = 0
        self.prefill_start_s = None
        self.prefill_end_s = None
        self.kv_transfer_start_s = None
        self.kv_transfer_end_s = None
        self.first_token_s = None
        self.finish_s = None
        self.fail_reason = ""
        self.token_ids = None  # the real engine keeps the token ids here; the sim does not
        self.stop_requested = False  # the body saw a stop token: end with the token just sampled

    @property
    def remaining_prefill(self) -> int:
        return self.prefill_target - self.prefilled

    @property
    def remaining_output(self) -> int:
        return self.output_tokens - self.generated

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.state}, prompt={self.prompt_tokens}, "
                f"gen={self.generated}/{self.output_tokens}, kv={self.kv_len}@{self.kv_device})")

    def as_row(self) -> tuple:
        """requests.csv row (traces.schema.REQUESTS column order)."""
        return (self.request_id, self.arrival_s, self.prompt_tokens, self.output_tokens, self.generated,
                self.prefill_start_s, self.prefill_end_s, self.kv_transfer_start_s, self.kv_transfer_end_s,
                self.first_token_s, self.finish_s, self.prefill_device or None, self.decode_device or None,
                self.mode, self.preemptions, self.state if self.state in DONE else FAILED,
                self.fail_reason or None)
