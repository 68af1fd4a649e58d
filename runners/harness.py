"""Our HybridLM behind lm-evaluation-harness's model interface: loglikelihoods, rolling
loglikelihoods and greedy generation, in batches, with the trial's own tokenizer.

Scoring right-pads a batch: every layer is causal, so padding after a sequence never
changes its logits. Generation cannot pad (a recurrent state would run over the padding),
so it batches prompts of equal length and decodes from the layers' static caches.
"""

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from arch.model import HybridLM


class HarnessModel(TemplateLM):
    def __init__(
        self, model: HybridLM, tokenizer, max_length: int, device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length  # the trial's training sequence length
        self._device = torch.device(device)
        self.batch_size = batch_size
        # bf16 as the trainer computes on a GPU; fp32 elsewhere
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self._device.type == "cuda"
            else contextlib.nullcontext()
        )

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.tokenizer.encode_batch([string])[0].tolist()

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor, caches: list[dict] | None = None) -> torch.Tensor:
        with self.autocast:
            return self.model(tokens.to(self._device), caches).float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of log p(continuation | context), whether greedy decoding gives it) for each
        (key, context tokens, continuation tokens); contexts longer than the model's window
        lose their oldest tokens, as the harness's own models do."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's "
                    f"window of {self.max_length}"
                )
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[-len(continuation) :]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # little padding
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(rows[batch[0]][0])
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                inputs[row, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = self._logits(inputs)
            for row, i in enumerate(batch):
                tokens, continuation = rows[i]
                end = len(tokens)
                # normalised over the scored positions alone: no second batch-sized tensor
                scored = F.log_softmax(logits[row, end - len(continuation) : end], -1).cpu()
                target = torch.tensor(continuation)
                total = scored.gather(-1, target[:, None]).sum().item()
                results[i] = (total, bool((scored.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each whole text's log-likelihood, over disjoint windows of the model's length."""
        windows, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for context, target in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, self.max_length, context_len=1
                ),
            ):
                windows.append((None, context, target))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut at its first stop string (or the end-of-text
        token, or max_gen_toks tokens)."""
        prompts = []
        for request in requests:
            context, options = request.args
            if options.get("do_sample") or options.get("temperature", 0) > 0:
                raise ValueError("HarnessModel generates greedily only (do_sample: false)")
            until = options.get("until") or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            max_new = int(options.get("max_gen_toks", 256))
            # room for the new tokens inside the model's window
            tokens = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            prompts.append((tokens, until, max_new))
        groups = defaultdict(list)  # equal prompt lengths and budgets decode as one batch
        for i, (tokens, _, max_new) in enumerate(prompts):
            groups[len(tokens), max_new].append(i)
        outputs = [""] * len(requests)
        for (_, max_new), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                prompt = torch.tensor([prompts[i][0] for i in batch])
                stops = [prompts[i][1] for i in batch]
                for i, text in zip(batch, self._greedy(prompt, max_new, stops), strict=True):
                    outputs[i] = text
        return outputs

    def _greedy(self, prompt: torch.Tensor, max_new: int, stops: list[list[str]]) -> list[str]:
        """Decode a batch of equal-length prompts token by token from static caches, until
        every row has reached a stop string, the end-of-text token or max_new tokens."""
        caches = self.model.allocate_caches(prompt.shape[0], prompt.shape[1] + max_new)
        logits = self._logits(prompt, caches)[:, -1]
        new: list[list[int]] = [[] for _ in stops]
        done = [False] * len(stops)
        for _ in range(max_new):
            token = logits.argmax(-1)
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                if t == self.eot_token_id:
                    done[row] = True
                    continue
                new[row].append(t)
                done[row] = any(s in self.tok_decode(new[row]) for s in stops[row])
            if all(done):
                break
            logits = self._logits(token[:, None], caches)[:, -1]
        return [
            _cut(self.tok_decode(tokens), until) for tokens, until in zip(new, stops, strict=True)
        ]


def _cut(text: str, stops: list[str]) -> str:
    """Text up to its first stop string."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text
