"""Assistant-only loss masks for real stock chat templates (no {% generation %} markers)."""

import os

import numpy as np
import pytest

import tokenizer_fixtures
from coach_jax import data
from coach_jax.data import chat_encoding

STOCK_TEMPLATES = ["chatml", "deepseek-v3_r1", "gemma2", "gemma3", "llama3", "llama3.1",
                   "llama3.2", "mistral-v0.3", "phi3", "qwen2", "qwen2.5", "qwen3", "zephyr"]
SYSTEM = "SYSTEM says be brief."
USER = ["What is the capital of France?", "Tell me a joke about cats."]
ASSISTANT = ["The capital of France is Paris.", "Why did the cat sit on the computer?"]
CONVERSATION = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER[0]}, {"role": "assistant", "content": ASSISTANT[0]},
                {"role": "user", "content": USER[1]}, {"role": "assistant", "content": ASSISTANT[1]}]
# Text a template itself writes inside an assistant turn, supervised by policy.
TEMPLATE_INSERTED = {"mistral-v0.3": {" "}, "qwen3": {"<think>\n\n</think>\n\n"}}


def _tokenizer(realworld, name):
    return tokenizer_fixtures.bpe_tokenizer(os.path.join(realworld, "templates", f"{name}.jinja"))


def supervised_runs(tokenizer, encoded):
    """Decoded text of each maximal run of supervised tokens."""
    ids, mask = encoded["input_ids"], encoded["loss_mask"]
    runs, start = [], None
    for i in range(len(ids) + 1):
        on = i < len(ids) and mask[i]
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(tokenizer.decode(ids[start:i].tolist()))
            start = None
    return runs


def assert_runs_are_assistant_turns(runs, contents, end_of_turn, inserted):
    assert len(runs) == len(contents), runs
    for run, content in zip(runs, contents):
        assert run.endswith(end_of_turn), run
        body = run[: -len(end_of_turn)]
        assert body.endswith(content), run
        assert body[: len(body) - len(content)] in {""} | inserted, run
        assert SYSTEM not in run and not any(u in run for u in USER)


@pytest.mark.parametrize("name", STOCK_TEMPLATES)
def test_masks_cover_exactly_the_assistant_turns(realworld, name):
    tokenizer = _tokenizer(realworld, name)
    messages = CONVERSATION if name != "gemma2" else CONVERSATION[1:]  # gemma2: no system role
    encoded = data.encode_chat(tokenizer, messages)
    assert encoded["input_ids"].dtype == np.int32 and encoded["loss_mask"].dtype == np.int8
    # The ids are the tokenization of the one full rendering, not stitched pieces.
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    np.testing.assert_array_equal(
        encoded["input_ids"], tokenizer(rendered, add_special_tokens=False)["input_ids"])
    layout = data.template_layout(tokenizer)
    assert_runs_are_assistant_turns(supervised_runs(tokenizer, encoded), ASSISTANT,
                                    layout.end_of_turn, TEMPLATE_INSERTED.get(name, set()))


def test_real_mistral_tokenizer(realworld):
    tokenizer = data.load_tokenizer(os.path.join(realworld, "tokenizers",
                                                 "mistral-7b-instruct-v0.3"))
    encoded = data.encode_chat(tokenizer, CONVERSATION)
    # SentencePiece decoding drops the space the template writes before each answer.
    assert_runs_are_assistant_turns(supervised_runs(tokenizer, encoded), ASSISTANT, "</s>",
                                    {" "})
    assert encoded["input_ids"][0] == tokenizer.bos_token_id
    assert encoded["input_ids"][1] != tokenizer.bos_token_id  # no double BOS


# trl's *_training.jinja templates mark the same families with {% generation %}.
TRL_PAIRS = {"llama3": "llama3_training", "qwen2.5": "qwen2_5_training",
             "gemma3": "gemma3_training", "phi3": "phi3_training",
             "deepseek-v3_r1": "deepseekv3_training", "qwen3": "qwen3_training"}


@pytest.mark.parametrize("name", list(TRL_PAIRS))
def test_masks_agree_with_generation_markers(realworld, name):
    tokenizer = _tokenizer(realworld, name)
    with open(os.path.join(realworld, "templates", "trl-training",
                           f"{TRL_PAIRS[name]}.jinja")) as f:
        marked_template = f.read()
    layout = data.template_layout(tokenizer)
    ours = supervised_runs(tokenizer, data.encode_chat(tokenizer, CONVERSATION))
    marked = tokenizer.apply_chat_template(CONVERSATION, chat_template=marked_template,
                                           return_dict=True, return_assistant_tokens_mask=True)
    theirs = supervised_runs(tokenizer, {"input_ids": np.asarray(marked["input_ids"]),
                                         "loss_mask": np.asarray(marked["assistant_masks"])})
    # Documented policy differences: trl also supervises the newline (and Phi-3's EOS) after
    # the end-of-turn token and, for some families, the header or its last newline.
    normalised = []
    for run in theirs:
        run = run[: run.index(layout.end_of_turn) + len(layout.end_of_turn)]
        overlap = max(k for k in range(len(layout.header) + 1)
                      if layout.header.endswith(run[:k]))
        normalised.append(run[overlap:])
    if name == "qwen3":  # trl's variant always renders think blocks; the stock one only last
        ours, normalised = ours[-1:], normalised[-1:]
    assert ours == normalised


def test_train_on_last_assistant_and_all(realworld):
    tokenizer = _tokenizer(realworld, "chatml")
    last = data.encode_chat(tokenizer, CONVERSATION, train_on="last_assistant")
    assert supervised_runs(tokenizer, last) == [ASSISTANT[1] + "<|im_end|>"]
    everything = data.encode_chat(tokenizer, CONVERSATION, train_on="all")
    assert everything["loss_mask"].all()
    with pytest.raises(ValueError, match=r"data\.train_on='some'"):
        data.encode_chat(tokenizer, CONVERSATION, train_on="some")


def test_reasoning_is_dropped_from_history_and_mask_follows(realworld):
    """Qwen3 rewrites earlier turns: reasoning survives only after the last user query."""
    tokenizer = _tokenizer(realworld, "qwen3")
    messages = [{"role": "user", "content": USER[0]},
                {"role": "assistant", "content": "<think>\nrecall\n</think>\n\n" + ASSISTANT[0]},
                {"role": "user", "content": USER[1]},
                {"role": "assistant", "content": "<think>\nfelines\n</think>\n\n" + ASSISTANT[1]}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages))
    assert runs == [ASSISTANT[0] + "<|im_end|>",
                    "<think>\nfelines\n</think>\n\n" + ASSISTANT[1] + "<|im_end|>"]


def test_tool_calls_are_supervised_tool_results_are_not(realworld):
    tokenizer = _tokenizer(realworld, "qwen2.5")
    call = {"type": "function", "id": "abc123def",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "RESULT sunny", "tool_call_id": "abc123def"},
                {"role": "assistant", "content": "It is sunny."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages, tools))
    assert len(runs) == 2
    assert runs[0].startswith("<tool_call>\n") and '"get_weather"' in runs[0]
    assert runs[0].endswith("</tool_call><|im_end|>")
    assert runs[1] == "It is sunny.<|im_end|>"


def test_system_fallback_merges_into_first_user_turn(realworld):
    tokenizer = _tokenizer(realworld, "gemma2")
    with pytest.raises(data.EncodingError, match="System role not supported"):
        data.encode_chat(tokenizer, CONVERSATION)
    conversation = data.normalize({"messages": CONVERSATION}, "openai")
    encoded = data.encode_example(tokenizer, conversation)
    text = tokenizer.decode(encoded["input_ids"].tolist())
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{USER[0]}" in text
    assert_runs_are_assistant_turns(supervised_runs(tokenizer, encoded), ASSISTANT,
                                    "<end_of_turn>", set())
    with pytest.raises(data.EncodingError):
        data.encode_example(tokenizer, conversation, system_fallback=False)


def test_template_error_names_the_record(realworld):
    tokenizer = _tokenizer(realworld, "mistral-v0.3")
    record = data.normalize({"messages": [{"role": "user", "content": "a"},
                                          {"role": "user", "content": "b"},
                                          {"role": "assistant", "content": "c"}]}, "openai",
                            data.Origin("chats.jsonl", line=7))
    with pytest.raises(data.EncodingError, match=r"chats\.jsonl:7: .*roles must alternate"):
        data.encode_example(tokenizer, record)


def test_end_of_turn_that_is_not_a_special_token_is_refused(realworld):
    """A tokenizer that splits the end-of-turn marker into pieces would never learn to stop."""
    broken = tokenizer_fixtures.bpe_tokenizer(
        os.path.join(realworld, "templates", "chatml.jinja"), register_specials=False)
    with pytest.raises(data.EncodingError, match="closes assistant turns with no special token"):
        data.encode_chat(broken, CONVERSATION)


def test_no_chat_template_is_a_clear_error(realworld):
    tokenizer = data.load_tokenizer(os.path.join(realworld, "tokenizers", "gpt-neox-20b")) \
        if os.path.exists(os.path.join(realworld, "tokenizers", "gpt-neox-20b",
                                       "tokenizer_config.json")) else None
    if tokenizer is None:
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(
            realworld, "tokenizers", "gpt-neox-20b", "tokenizer.json"))
    with pytest.raises(data.EncodingError, match="has no chat template"):
        data.encode_chat(tokenizer, CONVERSATION)


def test_double_bos_is_refused(realworld):
    tokenizer = _tokenizer(realworld, "llama3")
    doubled = "{{ bos_token }}" + tokenizer.chat_template
    clone = tokenizer_fixtures.bpe_tokenizer.__wrapped__(
        os.path.join(realworld, "templates", "llama3.jinja"))
    clone.chat_template = doubled
    with pytest.raises(data.EncodingError, match="two BOS"):
        data.encode_chat(clone, CONVERSATION)


def test_text_documents_supervise_every_token_and_end_with_eos(realworld):
    tokenizer = _tokenizer(realworld, "llama3")
    encoded = data.encode_text(tokenizer, "The quick brown fox.")
    assert encoded["loss_mask"].all()
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded["input_ids"][:-1].tolist()).endswith("The quick brown fox.")


def test_layout_is_probed_once_per_template(realworld):
    tokenizer = _tokenizer(realworld, "qwen2")
    chat_encoding._layout.cache_clear()
    for _ in range(3):
        data.encode_chat(tokenizer, CONVERSATION)
    assert chat_encoding._layout.cache_info().misses == 1


# --- Step 11: every published template (the survey is tests/test_template_masks.py) ---

def _more(realworld, name, base="neox"):
    folder = "templates-more" if "__" in name else "templates"
    return tokenizer_fixtures.template_tokenizer(
        os.path.join(realworld, folder, f"{name}.jinja"), base)


def test_token_holding_the_contents_first_character_is_supervised(realworld):
    """`[/INST] The`: byte-level BPE merges the space into ` The`, which the model must emit."""
    tokenizer = _more(realworld, "mistral-v0.3")
    encoded = data.encode_chat(tokenizer, CONVERSATION[1:3])
    ids, mask = encoded["input_ids"], encoded["loss_mask"]
    first = int(np.flatnonzero(mask)[0])
    assert tokenizer.decode(ids[first:first + 1].tolist()) == " The"
    assert tokenizer.decode(ids[first - 1:first].tolist()) == "[/INST]"


def test_token_spanning_the_end_and_the_next_header_is_not_supervised(realworld):
    """TeleChat closes turns with the text `<_end>` and opens the next with `<_user>`; `><`
    is one token: it spans the end of the turn and the next header, so it is not trained."""
    tokenizer = _more(realworld, "vllm__template_telechat")
    encoded = data.encode_chat(tokenizer, CONVERSATION)
    ids, mask = encoded["input_ids"], encoded["loss_mask"]
    pieces = [tokenizer.decode([int(i)]) for i in ids]
    straddling = pieces.index("><")
    assert not mask[straddling] and mask[straddling - 1] and pieces[straddling - 1] == "end"
    runs = supervised_runs(tokenizer, encoded)
    assert runs == [ASSISTANT[0] + "<_end", ASSISTANT[1] + "<_end>"]


@pytest.mark.parametrize("name", ["vllm__tool_chat_template_toolace",
                                  "vllm__tool_chat_template_phi4_mini",
                                  "sglang__test_xpu_gemma4_chat_template"])
def test_templates_that_ignore_the_generation_prompt_never_train_the_header(realworld, name):
    """These write the assistant header whatever add_generation_prompt says (or always), so a
    probed generation prompt is empty: the header comes from the conversation instead."""
    tokenizer = _more(realworld, name)
    layout = data.template_layout(tokenizer)
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, CONVERSATION))
    assert runs == [a + layout.end_of_turn for a in ASSISTANT]
    # Generation prompts end with the header, as training saw it before the content.
    prompt = tokenizer.decode(chat_encoding.encode_prompt(tokenizer, CONVERSATION[:4]).tolist())
    assert prompt.rstrip(" ").endswith(layout.header.rstrip(" "))


def test_one_letter_answers_are_located_exactly(realworld):
    """Vicuna writes `ASSISTANT: A</s>`: a search for "A" would land in the header."""
    tokenizer = _more(realworld, "unsloth__vicuna")
    messages = [{"role": "user", "content": "Pick A or B."}, {"role": "assistant", "content": "A"},
                {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "B"}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages))
    assert [r.strip() for r in runs] == ["A</s>", "B</s>"]


def test_reasoning_field_is_supervised_where_the_template_renders_it(realworld):
    """Qwen3 renders `reasoning_content` of turns after the last user query inside the turn
    (supervised) and drops it from earlier ones (never in the ids)."""
    tokenizer = _tokenizer(realworld, "qwen3")
    messages = [{"role": "user", "content": USER[0]},
                {"role": "assistant", "content": ASSISTANT[0], "reasoning_content": "recall"},
                {"role": "user", "content": USER[1]},
                {"role": "assistant", "content": ASSISTANT[1], "reasoning_content": "felines"}]
    encoded = data.encode_chat(tokenizer, messages)
    assert "recall" not in tokenizer.decode(encoded["input_ids"].tolist())
    assert supervised_runs(tokenizer, encoded) == [
        ASSISTANT[0] + "<|im_end|>", "<think>\nfelines\n</think>\n\n" + ASSISTANT[1] + "<|im_end|>"]


def test_gpt_oss_reasoning_is_a_separate_supervised_segment(realworld):
    """gpt-oss reads `thinking` and writes it as its own `<|start|>assistant` message in the
    analysis channel before the final answer: both are trained, the header between is not."""
    tokenizer = _more(realworld, "unsloth__gptoss")
    messages = [{"role": "user", "content": USER[0]},
                {"role": "assistant", "content": ASSISTANT[0], "reasoning_content": "recall"}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages))
    assert runs == ["<|channel|>analysis<|message|>recall<|end|>",
                    "<|channel|>final<|message|>" + ASSISTANT[0] + "<|end|>"]


def test_reasoning_keys_in_records(realworld):
    record = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello", "thinking": "greet back"}]}
    conversation = data.normalize(record, "openai")
    assert conversation.messages[1].reasoning == "greet back"
    assert conversation.template_messages()[1]["reasoning_content"] == "greet back"
    record["messages"][1]["reasoning_content"] = "twice"
    with pytest.raises(data.DataError, match=r"messages\[1\]: reasoning given twice"):
        data.normalize(record, "openai")
    user_reasoning = {"messages": [{"role": "user", "content": "hi", "reasoning": "why"},
                                   {"role": "assistant", "content": "hello"}]}
    with pytest.raises(data.DataError, match="only assistant messages carry reasoning"):
        data.normalize(user_reasoning, "openai")


def test_end_of_turn_is_appended_where_a_template_writes_none(realworld):
    tokenizer = _more(realworld, "vllm__template_qwen")  # writes nothing between turns
    with pytest.raises(data.EncodingError, match=r"set data\.end_of_turn"):
        data.encode_chat(tokenizer, CONVERSATION)
    encoded = data.encode_chat(tokenizer, CONVERSATION, end_of_turn="</s>")
    assert supervised_runs(tokenizer, encoded) == [a + "</s>" for a in ASSISTANT]
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    for answer in ASSISTANT:
        rendered = rendered.replace(answer, answer + "</s>")
    assert encoded["input_ids"].tolist() == tokenizer(rendered, add_special_tokens=False)[
        "input_ids"]
    assert chat_encoding.stop_token_ids(tokenizer, "</s>") == [tokenizer.eos_token_id]


def test_last_turn_left_open_by_the_template(realworld):
    """vLLM's inference ChatML writes `<|im_end|>` after every turn but the last: the ids stay
    the rendering's; data.end_of_turn appends the closer there."""
    tokenizer = _more(realworld, "vllm__template_chatml")
    layout = data.template_layout(tokenizer)
    assert layout.last_open and "no end-of-turn marker after the last" in layout.describe()
    assert supervised_runs(tokenizer, data.encode_chat(tokenizer, CONVERSATION)) == [
        ASSISTANT[0] + "<|im_end|>", ASSISTANT[1]]
    closed = data.encode_chat(tokenizer, CONVERSATION, end_of_turn="<|im_end|>")
    assert supervised_runs(tokenizer, closed) == [a + "<|im_end|>" for a in ASSISTANT]


def test_end_of_turn_must_agree_with_the_template(realworld):
    tokenizer = _tokenizer(realworld, "chatml")
    with pytest.raises(data.EncodingError, match=r"data\.end_of_turn='</s>', but the chat "
                                                 r"template closes assistant turns with"):
        data.encode_chat(tokenizer, CONVERSATION, end_of_turn="</s>")
    split = _more(realworld, "vllm__template_qwen")
    with pytest.raises(data.EncodingError, match="looks like a control token"):
        data.encode_chat(split, CONVERSATION, end_of_turn="<|not_a_token|>")


def test_template_problems_are_never_skipped_as_bad_records(realworld):
    tokenizer = _more(realworld, "vllm__template_qwen")
    example = data.normalize({"messages": CONVERSATION}, "openai", data.Origin("a.jsonl", 1))
    options = data.EncodeOptions(on_invalid="skip")
    with pytest.raises(data.EncodingError, match="data.end_of_turn"):
        list(data.encode_all([example], tokenizer, options))
    encoded = list(data.encode_all([example], tokenizer,
                                   data.EncodeOptions(on_invalid="skip", end_of_turn="</s>")))
    assert len(encoded) == 1


def test_template_report_shows_the_layout(realworld):
    report = data.template_report(_more(realworld, "unsloth__gptoss"))
    assert "assistant header: '<|start|>assistant' (from the generation prompt)" in report
    assert "end of turn: '<|end|>' (special token)" in report
    assert "tool-call turns end with: '<|call|>'" in report
    refused = data.template_report(_more(realworld, "vllm__template_qwen"))
    assert refused.startswith("chat template: refused:") and "data.end_of_turn" in refused


def test_eos_right_after_the_closer_is_supervised(realworld):
    """HyperCLOVA X closes turns with `<|im_end|><|endofturn|>`. With `<|endofturn|>` as the
    tokenizer's EOS (the model's stop token) both are trained; with `<|im_end|>` as EOS the
    marker after it is not. (Its generation prompt ends at `assistant`: the model writes the
    newline, or ` -> tool/function_call` for a call.)"""
    path = os.path.join(realworld, "templates-more",
                        "vllm__tool_chat_template_hyperclovax_seed_think_14b.jinja")
    tokenizer = tokenizer_fixtures.template_tokenizer.__wrapped__(path)
    tokenizer.eos_token = "<|endofturn|>"
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, CONVERSATION))
    assert runs == ["\n" + a + "<|im_end|><|endofturn|>" for a in ASSISTANT]
    plain = _more(realworld, "vllm__tool_chat_template_hyperclovax_seed_think_14b")
    assert plain.eos_token == "<|im_end|>"
    runs = supervised_runs(plain, data.encode_chat(plain, CONVERSATION))
    assert runs == ["\n" + a + "<|im_end|>" for a in ASSISTANT]


# --- Tool-call turns in agent trajectories (found in review) ---

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Web search",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def _call(name, arguments, call_id="call00001"):
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}}


ASK = {"role": "user", "content": "How is the weather?"}


def test_a_call_whose_name_is_in_an_earlier_calls_arguments(realworld):
    """Gemma 4 closes each call with `<tool_call|>`: the second call must not be looked for
    inside the first one's arguments."""
    tokenizer = _more(realworld, "vllm__tool_chat_template_gemma4")
    messages = [ASK, {"role": "assistant", "content": "", "tool_calls": [
        _call("get_weather", {"city": "search"}), _call("search", {"q": "rain"}, "call00002")]}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages, [WEATHER, SEARCH]))
    assert len(runs) == 1 and "call:search{q:" in runs[0] and runs[0].endswith("<tool_call|>")


@pytest.mark.parametrize("name", ["unsloth__gptoss",
                                  "vllm__tool_chat_template_hyperclovax_seed_think_14b"])
def test_content_and_call_written_as_two_messages_keep_the_header_out(realworld, name):
    tokenizer = _more(realworld, name)
    messages = [ASK, {"role": "assistant", "content": "Let me check.",
                      "tool_calls": [_call("get_weather", {"city": "Lyon"})]},
                {"role": "tool", "content": "Rain.", "tool_call_id": "call00001"}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages, [WEATHER]))
    assert len(runs) == 2 and "Let me check." in runs[0] and "Lyon" in runs[1]
    assert not any("assistant" in run for run in runs), runs


def test_whitespace_the_prompt_writes_after_a_shorter_header_is_context(realworld):
    """Gemma 4's generation prompt `<|turn>model\\n<|channel>thought\\n<channel|>` is longer
    than the header history writes (`<|turn>model\\n`): the newline is still the prompt's."""
    tokenizer = _more(realworld, "vllm__tool_chat_template_gemma4")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert supervised_runs(tokenizer, data.encode_chat(tokenizer, messages)) == ["Hello<turn|>"]


@pytest.mark.parametrize("name", ["sglang__tool_chat_template_deepseekv3",
                                  "vllm__tool_chat_template_gemma4"])
def test_a_second_call_straight_after_a_tool_result(realworld, name):
    """Multi-step tool use: these templates write the next call right after the tool output,
    with no assistant header; the call's own opening syntax is trained."""
    tokenizer = _more(realworld, name)
    messages = [ASK, {"role": "assistant", "content": "",
                      "tool_calls": [_call("get_weather", {"city": "Lyon"})]},
                {"role": "tool", "content": "Rain.", "tool_call_id": "call00001"},
                {"role": "assistant", "content": "",
                 "tool_calls": [_call("get_weather", {"city": "Paris"}, "call00002")]},
                {"role": "tool", "content": "Sun.", "tool_call_id": "call00002"},
                {"role": "assistant", "content": "Rain in Lyon, sun in Paris."}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages, [WEATHER]))
    opener = data.template_layout(tokenizer).call_opener[0]
    assert len(runs) == 3 and runs[1].startswith(opener) and "Paris" in runs[1]
    assert not any(text in "".join(runs) for text in ("Rain.", "Sun.", ASK["content"]))


def test_end_of_turn_closes_tool_calls_of_templates_without_closers(realworld):
    """GLM ends a call with `</tool_call>` and no token; with data.end_of_turn the marker
    follows it."""
    tokenizer = _more(realworld, "sglang__tool_and_thinking_chat_template_glm4.5")
    messages = [ASK, {"role": "assistant", "content": "",
                      "tool_calls": [_call("get_weather", {"city": "Lyon"})]},
                {"role": "tool", "content": "Rain.", "tool_call_id": "call00001"},
                {"role": "assistant", "content": "It rains."}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages, [WEATHER],
                                                       end_of_turn="</s>"))
    assert runs[0].endswith("</tool_call></s>") and runs[1].endswith("It rains.</s>")
    assert "Rain." not in "".join(runs) and "<|observation|>" not in "".join(runs)


def test_calls_written_before_the_content(realworld):
    tokenizer = _more(realworld, "vllm__tool_chat_template_minicpm3")
    messages = [ASK, {"role": "assistant", "content": "Let me check.",
                      "tool_calls": [_call("get_weather", {"city": "Lyon"})]},
                {"role": "tool", "content": "Rain.", "tool_call_id": "call00001"},
                {"role": "assistant", "content": "It rains."}]
    runs = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages, [WEATHER]))
    assert runs[0].startswith("<|tool_call_start|>") and runs[0].endswith(
        "Let me check.<|im_end|>")


def test_split_special_markers_are_refused(realworld):
    """A Gemma template with a tokenizer that splits `<end_of_turn>` would train it as text
    and never stop; likewise data.end_of_turn='</s>' on a tokenizer without `</s>`."""
    split = tokenizer_fixtures.bpe_tokenizer(
        os.path.join(realworld, "templates", "gemma3.jinja"), register_specials=False)
    with pytest.raises(data.EncodingError, match="'<end_of_turn>' looks like a control token"):
        data.encode_chat(split, CONVERSATION[1:])
    glm = _more(realworld, "sglang__tool_and_thinking_chat_template_glm4.5")
    with pytest.raises(data.EncodingError, match="splits it into pieces"):
        data.encode_chat(glm, CONVERSATION, end_of_turn="</s>" if "</s>" not in
                         glm.all_special_tokens else "<eos>")


def test_a_dropped_system_message_is_merged_into_the_first_user_turn(realworld):
    """Mistral v0.3 keeps the system prompt only when the conversation ends with a user turn,
    so for training data it would vanish; the system fallback keeps its text."""
    tokenizer = data.load_tokenizer(os.path.join(realworld, "tokenizers",
                                                 "mistral-7b-instruct-v0.3"))
    conversation = data.normalize({"messages": CONVERSATION}, "openai")
    assert SYSTEM not in tokenizer.decode(data.encode_chat(tokenizer, CONVERSATION)["input_ids"])
    encoded = data.encode_example(tokenizer, conversation)
    assert f"{SYSTEM}\n\n{USER[0]}" in tokenizer.decode(encoded["input_ids"].tolist())
    with pytest.raises(data.EncodingError, match="drops the system message"):
        data.encode_example(tokenizer, conversation, system_fallback=False)


def _neox_with(realworld, template):
    return data.load_tokenizer(os.path.join(realworld, "tokenizers", "gpt-neox-20b"),
                               os.path.join(realworld, "templates", f"{template}.jinja"))


def test_template_refusals_say_what_to_add(realworld):
    """A refusal names the fix: the special tokens to add to the tokenizer, or the
    data.end_of_turn marker (one the tokenizer has) to set instead."""
    chatml = _neox_with(realworld, "chatml")  # gpt-neox has no <|im_end|>
    with pytest.raises(data.EncodingError) as err:
        data.encode_chat(chatml, CONVERSATION)
    assert err.value.kind == "chat_template"
    assert ("add '<|im_end|>', '<|im_start|>' to the tokenizer as special tokens (tokenizer."
            "add_special_tokens({'additional_special_tokens': ['<|im_end|>', '<|im_start|>']})"
            in err.value.problem)
    assert "data.end_of_turn='<|endoftext|>'" in err.value.problem
    # The fix it names works: the turns end with the marker it suggests.
    fixed = data.encode_chat(chatml, CONVERSATION, end_of_turn="<|endoftext|>")
    assert [r.endswith("<|endoftext|>") for r in supervised_runs(chatml, fixed)] == [True, True]
    # A template that writes a token the tokenizer does not define at all.
    no_bos = tokenizer_fixtures.bpe_tokenizer(
        os.path.join(realworld, "templates", "llama3.jinja"), register_specials=False)
    with pytest.raises(data.EncodingError, match=r"it writes bos_token, which this tokenizer "
                                                 r"does not define.*add_special_tokens"
                                                 r"\(\{'bos_token'"):
        data.encode_chat(no_bos, CONVERSATION)
    # data.end_of_turn naming a token the tokenizer splits: add it, or name one it has.
    split = _more(realworld, "vllm__template_qwen")
    with pytest.raises(data.EncodingError, match=r"add '<\|not_a_token\|>' to the tokenizer "
                                                 r"as special token .* or set "
                                                 r"data\.end_of_turn to one of its special "
                                                 r"tokens \(e\.g\. '</s>'\)"):
        data.encode_chat(split, CONVERSATION, end_of_turn="<|not_a_token|>")


def test_a_refused_template_is_probed_once(realworld, monkeypatch):
    from coach_jax.data import template_probe
    tokenizer = _neox_with(realworld, "chatml")
    tokenizer.chat_template += " "  # a template of its own: not in the probe cache yet
    probes = []
    real = template_probe._probed
    monkeypatch.setattr(template_probe, "_probed",
                        lambda *args: probes.append(1) or real(*args))
    for _ in range(5):
        with pytest.raises(data.EncodingError, match="looks like a control token"):
            data.encode_chat(tokenizer, CONVERSATION)
    assert len(probes) == 1


def test_gpt_oss_harmony_masks_equal_trls_generation_markers(realworld):
    """trl's gpt-oss training template (harmony: channels, `<|end|>` closing earlier turns
    and `<|return|>` the last): ours equal its {% generation %} spans less the assistant
    headers, which ours leave unsupervised."""
    path = os.path.join(realworld, "templates", "trl-training", "gptoss_training.jinja")
    tokenizer = tokenizer_fixtures.template_tokenizer(path, "neox")
    messages = [{"role": "user", "content": USER[0]},
                {"role": "assistant", "content": ASSISTANT[0]},
                {"role": "user", "content": USER[1]},
                {"role": "assistant", "content": ASSISTANT[1], "thinking": "recall"}]
    ours = supervised_runs(tokenizer, data.encode_chat(tokenizer, messages))
    assert ours == ["<|channel|>final<|message|>" + ASSISTANT[0] + "<|end|>",
                    "<|channel|>analysis<|message|>recall<|end|>",
                    "<|channel|>final<|message|>" + ASSISTANT[1] + "<|return|>"]
    marked = tokenizer.apply_chat_template(messages, return_dict=True,
                                           return_assistant_tokens_mask=True)
    theirs = supervised_runs(tokenizer, {"input_ids": np.asarray(marked["input_ids"]),
                                         "loss_mask": np.asarray(marked["assistant_masks"])})
    # trl also marks the `<|start|>assistant` headers, which ours leave to the prompt.
    assert [run.replace("<|start|>assistant", "") for run in theirs] == [ours[0],
                                                                        ours[1] + ours[2]]
