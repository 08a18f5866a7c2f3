"""torchrun helper of tests/test_defects.py: PPO under FSDP2 with an eval hook that samples from
the (sharded) EMA policy, as recipes.instructgpt's win-rate hook does.

    torchrun --nproc_per_node 2 tests/ppo_eval_hook_run.py OUT SFT_RUN RM_RUN
"""
import sys

import torch

from engine.rollout import generate_responses
from recipes import common, ppo


def main(out, sft, rm):
    cfg, _ = common.parse(ppo.PPORecipeConfig, [
        f"--model.init={sft}", f"--rl.rm={rm}", "--dist.strategy=fsdp", "--ppo.batch_size=4",
        "--ppo.minibatch_size=2", "--ppo.max_new_tokens=6", "--rl.gen_group=2", "--train.max_steps=2",
        "--train.eval_every=1", "--train.threads=1", "--train.progress=false", "--data.seq_len=32"], "ppo")
    tok = common.find_tokenizer(sft)

    def hook(model):  # called on every rank, inside dist.gathered(model)
        roll = generate_responses(model, tok, ["Write a word.", "Say hi."], max_new_tokens=4, temperature=0.0)
        return {"hook_response_len": float(roll.mask.sum(1).mean())}

    ppo.run(cfg, out, eval_hook=hook)


if __name__ == "__main__":
    torch.set_num_threads(1)
    # as a recipe command: every rank leaves together and skips the interpreter teardown, where a
    # rank with a gloo group can abort ("terminate called without an active exception")
    common.cli(lambda argv: main(*sys.argv[1:4]))
