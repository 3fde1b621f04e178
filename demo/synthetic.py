"""Everything the demo and the tests need, made here: no hub, no third-party data.

- conversations in every format import-dataset.py reads (a repeated, learnable pattern),
- a tiny byte-level BPE tokenizer with a ChatML template,
- a Qwen2 architecture shrunk to a few layers, with random weights.

    python demo/synthetic.py OUT_DIR   # OUT_DIR/datasets/*, OUT_DIR/tokenizer, OUT_DIR/model
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import CHATML_TEMPLATE  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["apple", "car", "house", "bird", "river", "stone", "cloud", "book", "lamp", "door"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def conversations(n, seed=0, turns=(1, 3)):
    """n ShareGPT rows; the answers follow a pattern a tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns_ = []
        if rng.random() < 0.3:
            turns_.append({"from": "system", "value": "You answer with the color of things."})
        for _ in range(rng.randint(*turns)):
            thing, color = rng.choice(THINGS), rng.choice(COLORS)
            turns_.append({"from": "human", "value": f"The {thing} is {color}. What color is the {thing}?"})
            turns_.append({"from": "gpt", "value": f"The {thing} is {color}."})
        rows.append({"conversations": turns_})
    return rows


def as_openai(row):
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]}


def as_alpaca(row):
    turns = [t for t in row["conversations"] if t["from"] != "system"]
    return {"instruction": turns[0]["value"], "input": "", "output": turns[1]["value"]}


def as_prompt_completion(row):
    turns = [t for t in row["conversations"] if t["from"] != "system"]
    return {"prompt": turns[0]["value"], "completion": turns[1]["value"]}


def write_datasets(out_dir, n=1000, seed=0):
    """The same conversations as ShareGPT jsonl, OpenAI jsonl, Alpaca json, prompt/completion
    Parquet and CSV files; returns {format: path}."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = conversations(n, seed)
    paths = {name: out / file for name, file in [
        ("sharegpt", "sharegpt.jsonl"), ("openai", "openai.jsonl"), ("alpaca", "alpaca.json"),
        ("prompt_completion", "prompt_completion.parquet"), ("csv", "alpaca.csv")]}
    with open(paths["sharegpt"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(paths["openai"], "w") as f:
        f.writelines(json.dumps(as_openai(r)) + "\n" for r in rows)
    paths["alpaca"].write_text(json.dumps([as_alpaca(r) for r in rows]))
    pq.write_table(pa.Table.from_pylist([as_prompt_completion(r) for r in rows]), paths["prompt_completion"])
    pa_csv.write_csv(pa.Table.from_pylist([as_alpaca(r) for r in rows]), paths["csv"])
    return paths


def make_tokenizer(out_dir, vocab_size=512):
    """A byte-level BPE tokenizer trained on the synthetic text, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [t["value"] for r in conversations(2000, seed=1) for t in r["conversations"]]
    tokenizer.train_from_iterator(text + ["system user assistant tool\n"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    fast.save_pretrained(out_dir)
    return fast


def make_model(out_dir, tokenizer_dir, hidden_size=64, layers=2, seed=0, init_std=0.02):
    """A Qwen2 model with random weights, saved with its tokenizer as a published model is.
    With the usual init_std (0.02) its logits stay near 0 whatever an adapter does (the tied
    embeddings are that small); init_std=0.2 makes one whose LoRA adapter can learn the
    synthetic answers and to stop after them."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=hidden_size * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=init_std)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, tokenizer.eos_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(out_dir):
    out = Path(out_dir)
    write_datasets(out / "datasets")
    make_tokenizer(out / "tokenizer")
    make_model(out / "model", out / "tokenizer")
    print(f"synthetic datasets, tokenizer and model in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
