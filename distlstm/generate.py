"""`python -m distlstm.generate RUN --prompt TEXT`: text from a language model (model.task=lm) trained
on text that `python -m distlstm.prep` tokenised (so the run has its vocab.json).

    python -m distlstm.generate runs/shakespeare-char-1a2b3c4d --prompt "ROMEO:" --max-tokens 200 \\
        --temperature 0.8 --top-k 20 --seed 1

The prompt is encoded with the run's vocabulary and read in one pass; then one token at a time is
drawn from the model's next-token distribution (divided by --temperature; 0 = always the most likely
token; --top-k keeps only the k most likely) and fed back, carrying the LSTM state (h, c) from step
to step, so each new token costs one LSTM step. The unknown-token id is never drawn, so the output is
made of vocabulary tokens only. The same --seed gives the same text. Under torchrun every rank
generates the same text and rank 0 prints it.
"""

from __future__ import annotations

import os
import sys

import torch

from distlstm.checkpoint.artifacts import CHECKPOINT_HELP, load
from distlstm.config import command_parser
from distlstm.distributed.session import run_command
from distlstm.tasks import get_task


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_tokens: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, banned: tuple[int, ...] = (), device: str | torch.device = "cpu") -> list[int]:
    """`max_tokens` new token ids after `prompt_ids`, carrying the state token by token."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    x = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    logits, state = model.forward_with_state(x, torch.tensor([len(prompt_ids)], device=device))
    last = logits[0, -1]
    out: list[int] = []
    for _ in range(max_tokens):
        scores = last.float().cpu()
        if banned:
            scores[list(banned)] = float("-inf")
        if temperature <= 0:
            token = int(scores.argmax())
        else:
            scores = scores / temperature
            if top_k and top_k < scores.numel():
                kth = torch.topk(scores, top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
        out.append(token)
        step = torch.tensor([[token]], dtype=torch.int64, device=device)
        logits, state = model.forward_with_state(step, torch.ones(1, dtype=torch.int64, device=device), state)
        last = logits[0, -1]
    return out


def run(argv: list[str]) -> int:
    p = command_parser("generate", __doc__)
    p.add_argument("--prompt", required=True, help="text to continue (encoded with the run's vocab.json)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same text (default 0)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = p.parse_args(argv)
    for flag, value in (("--max-tokens", args.max_tokens), ("--top-k", args.top_k)):
        if value < 0:
            raise ValueError(f"{flag}={value} must be >= 0")
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    model, vocab, cfg = load(args.run, checkpoint=args.checkpoint, device=args.device)
    if not get_task(cfg.model.task).predicts_tokens:
        raise ValueError(f"{args.run} is a model.task={cfg.model.task!r} run; generate needs a language model "
                         f"(model.task=lm)")
    if vocab is None:
        raise ValueError(f"{args.run} has no vocab.json: generate needs an lm trained on text prepared with "
                         f"python -m distlstm.prep --tokenizer char|word")
    ids = generate(model, vocab.encode(args.prompt), max_tokens=args.max_tokens, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed, device=args.device,
                   banned=(vocab.unk_id, *range(len(vocab), cfg.model.vocab_size)))
    if int(os.environ.get("RANK", "0")) == 0:
        sep = "" if vocab.tokenizer == "char" else " "
        print(args.prompt + sep + vocab.decode(ids), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
