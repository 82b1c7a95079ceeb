"""The oracle of the conversation-fidelity tests: what the model's own tokenizer renders for a conversation."""

from __future__ import annotations

from so8t_deploy.chat.fidelity import Conversation


def hf_form(conversation: Conversation, system: str | None) -> list[dict]:
    """The conversation as transformers takes it (OpenAI-style tool calls), with the Modelfile's system prompt
    where the conversation has none, as Ollama adds it."""
    messages = [] if system is None or conversation.messages[0]["role"] == "system" else [
        {"role": "system", "content": system}]
    for m in conversation.messages:
        message = {"role": m["role"], "content": m["content"]}
        if m.get("thinking"):
            message["reasoning_content"] = m["thinking"]
        if m.get("tool_calls"):
            message["tool_calls"] = [{"id": c["id"], "type": "function", "function": c["function"]}
                                     for c in m["tool_calls"]]
        if m["role"] == "tool":
            message.update(tool_call_id=m["tool_call_id"], name=m["tool_name"])
        messages.append(message)
    return messages


def trained_prompt(tokenizer, conversation: Conversation, system: str | None) -> str:
    """The tokenizer's own rendering, less the leading BOS that llama.cpp adds when it tokenizes."""
    kwargs = {} if conversation.think is None else {"enable_thinking": conversation.think}
    prompt = tokenizer.apply_chat_template(hf_form(conversation, system), add_generation_prompt=True,
                                           tokenize=False, **kwargs)
    bos = tokenizer.bos_token
    return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt
