"""The request mix the gateway's end-to-end tests send with the official
`openai` client: of every 4, one image (sdxl), one streamed chat and two
plain chats (llm), each answered by a stand-in with 5 tokens."""

from __future__ import annotations

import openai

TOKENS = "tok0 tok1 tok2 tok3 tok4 "  # what a stand-in answers for max_tokens 5
IMAGE = "image"  # what ``one`` returns for a whole image answer


def one(client: openai.OpenAI, i: int, chat_model: str = "qwen-7b", image_model: str = "sdxl-base") -> str:
    """Request ``i`` of the mix; returns the text received, ``IMAGE``, or what was wrong."""
    if i % 4 == 3:
        img = client.images.generate(model=image_model, prompt=f"cat {i}", n=1, size="256x256")
        return IMAGE if img.data and (img.data[0].b64_json or "").startswith("iVBORw0KGgo") else "no image"
    if i % 4 == 1:
        stream = client.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": str(i)}], max_tokens=5, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    r = client.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": str(i)}], max_tokens=5)
    return r.choices[0].message.content or ""
