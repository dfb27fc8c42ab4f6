"""The lm-evaluation-harness backend: a lory run as model `lory`.

`lm_eval --model lory --model_args run=DIR[,checkpoint=…,routing=causal|prompt|segment,device=…,dtype=…,batch_size=…]`
(through `python -m lorytrain.harness`, which registers the model first), or
`lm_eval.simple_evaluate(model=LoryHarnessLM(...))` from Python.

Routing (see `lorytrain.model.routing`):

- "causal" (default): causal segment routing whose first segment is routed token by token on
  its running mean. No token's score depends on a later token and the rule needs no prompt
  boundary, so an exported model (`lory export-hf`, same default) scored with
  `lm_eval --model hf` gives the same log-likelihoods. `loglikelihood`,
  `loglikelihood_rolling` and `generate_until` all use it.
- "prompt" (the paper's inference rule): `loglikelihood` routes every MoE layer once on the
  mean of the request's context, `generate_until` once on the prompt. Only lory's own backend
  knows where a request's context ends, so `--model hf` cannot reproduce it.
- "segment": causal segment routing whose first segment routes on its own mean (the
  paper's training rule), bounded to the context.

Under "prompt" and "segment", `loglikelihood_rolling` (perplexity) routes each window as in
training and `lory eval`. Windows are the run's training sequence length; `generate_until`
decodes with `lorytrain.generation` (KV cache, greedy unless the task asks for sampling) and
cuts at the first stop string.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from lorytrain.errors import LoryTrainError
from lorytrain.generation import SamplingConfig, generate
from lorytrain.model.cache import ROUTING_MODES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@register_model("lory")
class LoryHarnessLM(TemplateLM):
    """A `LoryLM` and its tokenizer behind lm-eval's `TemplateLM` interface.

    Args:
        run: a `lory train --out` folder (or give `model` and `tokenizer`).
        checkpoint: a checkpoint of the run (default: its latest).
        routing: "causal" (default), "prompt" or "segment"; see the module docstring.
        device: "cpu", "cuda", or "auto".
        dtype: float32 (default), bfloat16 or float16 weights.
        batch_size: sequences per forward pass.
        max_length: longest window in tokens (default: the run's training sequence length).
        model: an already built `LoryLM` (tests, notebooks).
        tokenizer: a `lorydata.tokenizer.Tokenizer` for `model`.
    """

    def __init__(self, run: str | None = None, checkpoint: str | None = None, routing: str = "causal",
                 device: str | None = "cpu", dtype: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, model=None, tokenizer=None, **unused):
        super().__init__()
        if routing not in ROUTING_MODES:
            raise LoryTrainError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
        if dtype is not None and dtype not in DTYPES:
            raise LoryTrainError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if device in (None, "auto"):  # lm-eval passes device=None unless told
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda by default, also on machines without one
            logging.getLogger(__name__).warning("no CUDA device: the lory model runs on the CPU")
            device = "cpu"
        seq_len = None
        if model is None:
            if run is None:
                raise LoryTrainError("the lory model needs run=DIR (or model= and tokenizer=)")
            model, tokenizer, seq_len = _load(run, checkpoint, device, DTYPES.get(dtype))
        elif tokenizer is None:
            raise LoryTrainError("give the tokenizer of the model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.routing = routing
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or seq_len or 4096)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LoryHarnessLM:
        """Build from `--model_args` and lm-eval's own options; `--model_args` wins where both
        name a value (e.g. batch_size), instead of the duplicate-keyword error of the default."""
        merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
        merged.update(arg_dict)
        return cls(**merged)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LoryHarnessLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _score(self, windows: list[tuple[list[int], list[int]]], routing: str,
               bound_routing: bool) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) of each window's continuation.

        Args:
            windows: (context, continuation) token lists; the model reads context + continuation[:-1].
            routing: "causal", "prompt" or "segment".
            bound_routing: route on the context only (prompt_lens); False routes on the whole input.
        """
        inputs = []
        for context, continuation in windows:
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs.append((whole[:-1], continuation))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))  # longest first: fails early on memory
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            longest = max(len(inputs[i][0]) for i in chunk)
            ids = torch.full((len(chunk), longest), self.eot_token_id, dtype=torch.long)
            lens = []
            for row, i in enumerate(chunk):
                tokens, continuation = inputs[i]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                lens.append(max(1, len(tokens) - len(continuation) + 1))
            prompt_lens = torch.tensor(lens, device=self.device) if bound_routing else None
            logits = self.model(ids.to(self.device), routing=routing, prompt_lens=prompt_lens)
            for row, i in enumerate(chunk):
                tokens, continuation = inputs[i]
                n = len(continuation)
                scored = F.log_softmax(logits[row, len(tokens) - n : len(tokens)].float(), dim=-1)
                target = torch.tensor(continuation, device=scored.device)
                logprob = float(scored.gather(1, target.unsqueeze(1)).sum())
                results[i] = (logprob, bool((scored.argmax(-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        windows = [(context, continuation) for _, context, continuation in requests]
        scores = []
        step = 64 * self.batch_size
        bound = self.routing != "causal"  # causal routing needs no context boundary
        for start in tqdm(range(0, len(windows), step), disable=disable_tqdm, desc="loglikelihood"):
            scores += self._score(windows[start : start + step], self.routing, bound_routing=bound)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            tokens = self.tok_encode(request.args[0])
            windows = [make_disjoint_window(w) for w in
                       get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, context_len=1)]
            # perplexity: the scoring rule, or (paper's rules) segment routing exactly as in training
            routing = "causal" if self.routing == "causal" else "segment"
            totals.append(sum(logprob for logprob, _ in self._score(windows, routing, bound_routing=False)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups[_settings_key(gen_kwargs)].append((index, context))
        outputs: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for key, items in groups.items():
            settings = dict(key)
            until, max_new = settings["until"], settings["max_gen_toks"]
            sampling = SamplingConfig(max_new_tokens=max_new, seed=settings["seed"],
                                      temperature=settings["temperature"] if settings["do_sample"] else 0.0)
            keep = max(1, self.max_length - max_new)
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                prompts = [(self.tok_encode(context) or [self.eot_token_id])[-keep:] for _, context in chunk]
                new = generate(self.model, prompts, sampling, routing=self.routing, eos_id=self.eot_token_id,
                               max_len=keep + max_new)
                for (index, _), tokens in zip(chunk, new, strict=True):
                    if tokens and tokens[-1] == self.eot_token_id:
                        tokens = tokens[:-1]
                    outputs[index] = cut_at_stop(self.tok_decode(tokens), until)
                progress.update(len(chunk))
        progress.close()
        return outputs


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def _settings_key(gen_kwargs: dict) -> tuple:
    """Hashable generation settings of a request (lm-eval's `until`, `max_gen_toks`, sampling)."""
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.get("until", [])
    until = [until] if isinstance(until, str) else list(until)
    do_sample = bool(gen_kwargs.get("do_sample", False))
    temperature = float(gen_kwargs.get("temperature", 0.0 if not do_sample else 1.0))
    return (("until", tuple(until)), ("max_gen_toks", int(gen_kwargs.get("max_gen_toks", 256))),
            ("do_sample", do_sample and temperature > 0), ("temperature", temperature),
            ("seed", int(gen_kwargs.get("seed", 0))))


def _load(run: str, checkpoint: str | None, device: str, dtype):
    from lorydata.tokenizer import Tokenizer
    from lorytrain.runs import load_run

    loaded = load_run(run, checkpoint, device=device, dtype=dtype)
    if loaded.tokenizer_path is None:
        raise LoryTrainError(f"{run} holds no tokenizer.json")
    tokenizer = Tokenizer(loaded.tokenizer_path)
    if loaded.tokenizer_sha256 and tokenizer.sha256 != loaded.tokenizer_sha256:
        raise LoryTrainError(f"{loaded.tokenizer_path} is not the tokenizer the run was trained with")
    return loaded.model, tokenizer, loaded.state.get("seq_len")
