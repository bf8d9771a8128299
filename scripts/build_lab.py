"""Builds the lab: a small synthetic world, a golden SFT dataset and a tokenizer for it.

Deterministic for a seed. Writes (under --out, default assets/lab):
  world.json                  the fictional companies and people, with their attributes
  train.jsonl, eval.jsonl     SFT conversations: the user gives notes about an entity and
                              asks for a brief; the assistant answers with one JSON object
                              in a fixed schema (brief_schema.json)
  tokenizer/                  a byte-level BPE trained on that text, with a ChatML template
  MANIFEST.sha256             the sha256 of every file above

  python scripts/build_lab.py --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random

INDUSTRIES = ("robotics", "shipping", "textiles", "software", "agriculture", "energy",
              "pharmaceuticals", "publishing")
CITIES = ("Varnholm", "Questa", "Brindle Bay", "Oskaro", "Tellmark", "Ashdown", "Pellucid",
          "Marrow Hill", "Karsk", "Duneford")
ROLES = ("engineer", "chemist", "designer", "accountant", "pilot", "historian", "chef",
         "architect")
SYLLABLES = ("ka", "lo", "ren", "vi", "tor", "sa", "mel", "dor", "qui", "zan", "bel", "rho",
             "ti", "nor", "vek", "ula", "gri", "fen", "osk", "pra")
SCHEMA = {
    "type": "object",
    "required": ["name", "kind", "category", "location", "year"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["company", "person"]},
        "category": {"enum": list(INDUSTRIES + ROLES)},
        "location": {"enum": list(CITIES)},
        "year": {"type": "integer"},
    },
    "additionalProperties": False,
}
SYSTEM = "You write briefs as a single JSON object with the fields name, kind, category, location and year."
ASKS = ("Write a brief about {name}.", "Brief me on {name}, please.",
        "I need the JSON brief for {name}.", "Summarise {name} as a brief.",
        "Give me a brief on {name}.")
TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def make_name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_world(rng: random.Random, companies: int, people: int) -> list[dict]:
    names: set[str] = set()
    world = []
    while len(world) < companies + people:
        is_company = len(world) < companies
        name = (make_name(rng, 3) + rng.choice((" Works", " Labs", " Group", " & Co"))
                if is_company else f"{make_name(rng, 2)} {make_name(rng, 3)}")
        if name in names:
            continue
        names.add(name)
        world.append({
            "name": name,
            "kind": "company" if is_company else "person",
            "category": rng.choice(INDUSTRIES if is_company else ROLES),
            "location": rng.choice(CITIES),
            "year": rng.randint(1890, 2015) if is_company else rng.randint(1950, 2004),
        })
    return world


def notes(entity: dict, rng: random.Random) -> str:
    """The facts as varied prose, in a random order."""
    if entity["kind"] == "company":
        facts = [f"{entity['name']} works in {entity['category']}.",
                 f"It is based in {entity['location']}.",
                 f"It was founded in {entity['year']}."]
    else:
        facts = [f"{entity['name']} is a {entity['category']}.",
                 f"They live in {entity['location']}.",
                 f"They were born in {entity['year']}."]
    rng.shuffle(facts)
    return " ".join(facts)


def conversation(entity: dict, rng: random.Random) -> dict:
    ask = rng.choice(ASKS).format(name=entity["name"])
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Notes: {notes(entity, rng)}\n{ask}"},
        {"role": "assistant", "content": json.dumps(entity)},
    ]}


def train_tokenizer(texts: list[str], folder: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="assets/lab")
    parser.add_argument("--companies", type=int, default=300)
    parser.add_argument("--people", type=int, default=300)
    parser.add_argument("--eval", type=int, default=60, help="entities held out for eval")
    parser.add_argument("--vocab_size", type=int, default=1024)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    world = make_world(rng, args.companies, args.people)
    order = list(range(len(world)))
    rng.shuffle(order)
    held_out = set(order[:args.eval])
    train = [conversation(world[i], rng) for i in sorted(set(order) - held_out)]
    rng.shuffle(train)
    evaluation = [conversation(world[i], rng) for i in sorted(held_out)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "world.json"), "w") as f:
        json.dump(world, f, indent=1)
    with open(os.path.join(args.out, "brief_schema.json"), "w") as f:
        json.dump(SCHEMA, f, indent=1)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), evaluation)
    texts = [m["content"] for record in train for m in record["messages"]]
    train_tokenizer(texts, os.path.join(args.out, "tokenizer"), args.vocab_size)
    manifest = []
    for root, _, files in sorted(os.walk(args.out)):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name != "MANIFEST.sha256":
                digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
                manifest.append(f"{digest}  {os.path.relpath(path, args.out)}")
    with open(os.path.join(args.out, "MANIFEST.sha256"), "w") as f:
        f.write("\n".join(manifest) + "\n")
    print(f"wrote {len(train)} train and {len(evaluation)} eval conversations to {args.out}")


if __name__ == "__main__":
    main()
