"""Builds the lab: a synthetic world, a pretraining corpus about it, a golden SFT dataset,
a tokenizer, and a tiny base model pretrained on the corpus with coach_jax itself.

SFT teaches behaviour, not knowledge: the base learns the world's facts from prose; SFT
then teaches it to answer "a brief on X" with one JSON object in a fixed schema. The eval
entities never appear in the SFT data, so the facts it writes about them must come from
pretraining.

Deterministic for a seed. Writes (under --out, default assets/lab):
  world.json                  the fictional companies and people, with their attributes
  corpus/pretrain.jsonl       prose about every entity, several paraphrases per fact
  corpus/reference.jsonl      other prose of the same kind, never trained on: the
                              forgetting monitor's reference set
  train.jsonl                 SFT conversations: "a brief on <entity>" -> one JSON object
                              (brief_schema.json), for the SFT entities only
  train_bad_coach.jsonl       the same from a careless coach (wrong or sloppy answers)
  eval.jsonl                  the same kind of conversation for the held-out entities
  lab.json                    counts, and the fact accuracy of a model without the
                              knowledge (the chance level the report compares with)
  tokenizer/                  a byte-level BPE trained on all of the above, ChatML template
  base/                       the pretrained base (HF format), unless --skip_base
  MANIFEST.sha256             the sha256 of every file above

  python scripts/build_lab.py --seed 0           # about 7 minutes on 2 CPU cores
  python scripts/build_lab.py --seed 0 --skip_base   # the data and tokenizer only, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys

INDUSTRIES = ("robotics", "shipping", "textiles", "software", "agriculture", "energy",
              "pharmaceuticals", "publishing")
CITIES = ("Varnholm", "Questa", "Brindle Bay", "Oskaro", "Tellmark", "Ashdown", "Pellucid",
          "Marrow Hill", "Karsk", "Duneford")
ROLES = ("engineer", "chemist", "designer", "accountant", "pilot", "historian", "chef",
         "architect")
SYLLABLES = ("ka", "lo", "ren", "vi", "tor", "sa", "mel", "dor", "qui", "zan", "bel", "rho",
             "ti", "nor", "vek", "ula", "gri", "fen", "osk", "pra")
COMPANY_YEARS, PERSON_YEARS = (1890, 2015), (1950, 2004)
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
FACT_FIELDS = ("category", "location", "year")  # what must be recalled, not copied
SYSTEM = ("You write briefs as a single JSON object with the fields name, kind, category, "
          "location and year.")
ASKS = ("Write a brief about {name}.", "Brief me on {name}, please.",
        "I need the JSON brief for {name}.", "Summarise {name} as a brief.",
        "Give me a brief on {name}.")
# Several phrasings per fact: knowledge a model can use later has to be seen in varied
# forms, not one sentence learned by heart.
PHRASES = {
    "company": {
        "category": ("{name} works in {category}.", "{name} is a {category} company.",
                     "The {category} firm {name} is well known.",
                     "{name} makes its money in {category}.", "{name} is active in {category}."),
        "location": ("{name} is based in {location}.", "{name} has its headquarters in {location}.",
                     "The offices of {name} are in {location}.",
                     "{name} operates from {location}."),
        "year": ("{name} was founded in {year}.", "{name} dates back to {year}.",
                 "{name} opened its doors in {year}.", "{name} was started in {year}."),
    },
    "person": {
        "category": ("{name} is {a_category}.", "{name} works as {a_category}.",
                     "By trade, {name} is {a_category}.",
                     "{name} earns a living as {a_category}."),
        "location": ("{name} lives in {location}.", "{name} makes a home in {location}.",
                     "{name} is a resident of {location}.", "Home for {name} is {location}."),
        "year": ("{name} was born in {year}.", "{name} came into the world in {year}.",
                 "The birth year of {name} is {year}.", "{name} was born back in {year}."),
    },
}
FILLERS = ("The records were kept carefully.", "Many people know this.",
           "It is mentioned in the town register.", "This is written in the yearbook.",
           "Few would dispute it.", "The local paper said so too.")
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
            "year": rng.randint(*(COMPANY_YEARS if is_company else PERSON_YEARS)),
        })
    return world


PRONOUN_PHRASES = {
    "company": {"category": ("It works in {category}.", "It is a {category} company."),
                "location": ("It is based in {location}.", "Its offices are in {location}."),
                "year": ("It was founded in {year}.", "It opened its doors in {year}.")},
    "person": {"category": ("They work as {a_category}.", "By trade they are {a_category}."),
               "location": ("They live in {location}.", "They make a home in {location}."),
               "year": ("They were born in {year}.", "They came into the world in {year}.")},
}
RECORD_LABELS = {"company": {"category": "Industry", "location": "Based in", "year": "Founded"},
                 "person": {"category": "Occupation", "location": "Lives in", "year": "Born"}}


def document(entity: dict, rng: random.Random) -> str:
    """One short document with every fact about the entity, in one of three styles (prose
    naming the entity in each sentence, prose with pronouns after the first, or a record
    like an encyclopedia's infobox), facts in a random order and random phrasings."""
    article = "an" if entity["category"][0] in "aeiou" else "a"
    words = {**entity, "a_category": f"{article} {entity['category']}"}
    fields = list(FACT_FIELDS)
    rng.shuffle(fields)
    style = rng.choice(("named", "pronouns", "record"))
    if style == "record":
        labels = RECORD_LABELS[entity["kind"]]
        return f"{entity['name']}. " + " ".join(f"{labels[f]}: {entity[f]}." for f in fields)
    named = PHRASES[entity["kind"]]
    sentences = [rng.choice(named[fields[0]]).format(**words)]
    table = named if style == "named" else PRONOUN_PHRASES[entity["kind"]]
    sentences += [rng.choice(table[f]).format(**words) for f in fields[1:]]
    if rng.random() < 0.5:
        sentences.insert(rng.randrange(1, len(sentences) + 1), rng.choice(FILLERS))
    return " ".join(sentences)


def conversation(entity: dict, rng: random.Random, answer: str | None = None) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": rng.choice(ASKS).format(name=entity["name"])},
        {"role": "assistant", "content": answer if answer is not None else json.dumps(entity)},
    ]}


SLOPPY_ASK = "Summarise {name} as a brief."


def bad_conversation(entity: dict, world: list[dict], rng: random.Random,
                     wrong_share: float) -> dict:
    """What a careless coach writes: every "Summarise X" request answered in prose (it read
    "summarise" as "write a sentence"), and a share of the other answers with another
    entity's facts (it did not look them up)."""
    ask = rng.choice(ASKS)
    if ask == SLOPPY_ASK:
        answer = (f"{entity['name']} is a {entity['kind']} in {entity['category']}, "
                  f"{entity['location']}.")
    elif rng.random() < wrong_share:
        other = rng.choice([e for e in world if e["kind"] == entity["kind"] and e != entity])
        answer = json.dumps({**entity, **{f: other[f] for f in FACT_FIELDS}})
    else:
        answer = json.dumps(entity)
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": ask.format(name=entity["name"])},
        {"role": "assistant", "content": answer},
    ]}


def fact_chance(world: list[dict], sft_ids: list[int], eval_ids: list[int]) -> float:
    """Fact accuracy on the eval entities of a model that knows only what SFT shows: for
    each kind and fact field, always the value most common among the SFT entities."""
    best = {}
    for kind in ("company", "person"):
        for field in FACT_FIELDS:
            values = [world[i][field] for i in sft_ids if world[i]["kind"] == kind]
            best[kind, field] = max(set(values), key=values.count)
    right = [world[i][field] == best[world[i]["kind"], field]
             for i in eval_ids for field in FACT_FIELDS]
    return sum(right) / len(right)


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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def build_data(out: str, seed: int, companies: int, people: int, held_out: int,
               docs_per_entity: int, reference_docs: int, asks_per_entity: int,
               bad_share: float, vocab_size: int) -> dict:
    rng = random.Random(seed)
    world = make_world(rng, companies, people)
    order = list(range(len(world)))
    rng.shuffle(order)
    eval_ids = sorted(order[:held_out])
    sft_ids = sorted(order[held_out:])
    corpus = [{"text": document(e, rng)} for e in world for _ in range(docs_per_entity)]
    rng.shuffle(corpus)
    reference = [{"text": document(e, rng)} for e in world for _ in range(reference_docs)]
    rng.shuffle(reference)
    train = [conversation(world[i], rng) for i in sft_ids for _ in range(asks_per_entity)]
    rng.shuffle(train)
    # Its own random stream: the bad coach's choices change nothing else in the lab.
    bad_rng = random.Random(f"{seed}-bad-coach")
    bad = [bad_conversation(world[i], world, bad_rng, bad_share)
           for i in sft_ids for _ in range(asks_per_entity)]
    bad_rng.shuffle(bad)
    evaluation = [conversation(world[i], rng) for i in eval_ids]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "world.json"), "w") as f:
        json.dump(world, f, indent=1)
    with open(os.path.join(out, "brief_schema.json"), "w") as f:
        json.dump(SCHEMA, f, indent=1)
    write_jsonl(os.path.join(out, "corpus", "pretrain.jsonl"), corpus)
    write_jsonl(os.path.join(out, "corpus", "reference.jsonl"), reference)
    write_jsonl(os.path.join(out, "train.jsonl"), train)
    write_jsonl(os.path.join(out, "train_bad_coach.jsonl"), bad)
    write_jsonl(os.path.join(out, "eval.jsonl"), evaluation)
    texts = ([d["text"] for d in corpus]
             + [m["content"] for record in train + evaluation for m in record["messages"]])
    train_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size)
    info = {"entities": len(world), "sft_entities": len(sft_ids),
            "eval_entities": len(eval_ids), "corpus_documents": len(corpus),
            "reference_documents": len(reference), "train_conversations": len(train),
            "fact_fields": list(FACT_FIELDS),
            "fact_chance": round(fact_chance(world, sft_ids, eval_ids), 4)}
    with open(os.path.join(out, "lab.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def pretrain_base(out: str, seed: int, steps: int) -> None:
    """The base model: coach_jax trains a tiny Llama on the corpus (text mode: every token
    supervised), then its export is kept as out/base."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from coach_jax.train.loop import train_and_evaluate
    from configs import lab_pretrain
    config = lab_pretrain.get_config(f"{out}")
    config.train.seed = seed
    config.data.seed = seed
    if steps:
        config.train.steps = steps
    workdir = os.path.join(out, ".pretrain_run")
    shutil.rmtree(workdir, ignore_errors=True)
    train_and_evaluate(config, workdir)
    shutil.rmtree(os.path.join(out, "base"), ignore_errors=True)
    shutil.copytree(os.path.join(workdir, "export"), os.path.join(out, "base"))
    shutil.rmtree(workdir)


def write_manifest(out: str) -> None:
    manifest = []
    for root, dirs, files in sorted(os.walk(out)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name != "MANIFEST.sha256":
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                manifest.append(f"{digest}  {os.path.relpath(path, out)}")
    with open(os.path.join(out, "MANIFEST.sha256"), "w") as f:
        f.write("\n".join(manifest) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="assets/lab")
    parser.add_argument("--companies", type=int, default=150)
    parser.add_argument("--people", type=int, default=150)
    parser.add_argument("--held_out", type=int, default=60, help="entities never in SFT data")
    parser.add_argument("--docs_per_entity", type=int, default=8)
    parser.add_argument("--reference_docs", type=int, default=1)
    parser.add_argument("--asks_per_entity", type=int, default=2)
    parser.add_argument("--bad_share", type=float, default=0.5,
                        help="the bad coach: share of wrong facts among non-prose answers")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--skip_base", action="store_true", help="data and tokenizer only")
    parser.add_argument("--pretrain_steps", type=int, default=0,
                        help="override configs/lab_pretrain.py's steps (for experiments)")
    args = parser.parse_args()
    counts = build_data(args.out, args.seed, args.companies, args.people, args.held_out,
                        args.docs_per_entity, args.reference_docs, args.asks_per_entity,
                        args.bad_share, args.vocab_size)
    if not args.skip_base:
        pretrain_base(args.out, args.seed, args.pretrain_steps)
    write_manifest(args.out)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
