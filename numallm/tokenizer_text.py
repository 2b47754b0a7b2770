"""Byte and text passes of llama.cpp's tokenizer (llama-vocab.cpp) that need no vocabulary:
detokenizer space clean-up, the UTF-8 completeness check of streaming, WordPiece word splitting."""
from __future__ import annotations

import unicodedata


def clean_spaces(buf: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces, three in-place passes over the bytes."""
    t = bytearray(buf)
    # pass 1: " ?", " !", " .", " ," lose the space
    n, total = len(t), 1 if t else 0
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    del t[total:]
    # pass 2: a lone apostrophe between spaces, " ' " -> "'"
    n, total, i = len(t), 1 if t else 0, 1
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0  # the space after it is dropped (and no longer counts as a space)
        t[total] = x
        total += 1
        i += 1
    del t[total:]
    # pass 3: " 's", " 'm", " 're", " 've" lose the space
    n, total = len(t), 1 if t else 0
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif i + 2 < n and (x1, t[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                total -= 1
        t[total] = x
        total += 1
    del t[total:]
    return bytes(t)


def complete_prefix_len(buf: bytearray) -> int:
    """Length of `buf` without a trailing, still incomplete UTF-8 sequence."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0xC0 != 0x80:  # lead byte or ASCII: is its sequence complete?
            need = 1 if b < 0xC0 or b >= 0xF8 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n - back if need > back else n
    return n  # only continuation bytes: invalid anyway, emit (as U+FFFD)


# -- WordPiece text preparation (llama.cpp's crude normalisation, via unicodedata) --------------
_WPM_SPACE = {*range(0x09, 0x0E), *range(0x2000, 0x200B), 0x20, 0x85, 0xA0, 0x1680, 0x2028,
              0x2029, 0x202F, 0x205F, 0x3000}
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def wpm_words(text: str) -> list[str]:
    words, cur = [], []
    for ch in text:
        ch = unicodedata.normalize("NFD", ch)[0]  # llama.cpp keeps only the base code point
        cp = ord(ch)
        if cp in _WPM_SPACE:
            if cur:
                words.append("".join(cur))
                cur = []
            continue
        cat = unicodedata.category(ch)
        if cp == 0 or cp == 0xFFFD or cat[0] == "C" and cat != "Cn":
            continue
        low = ch.lower()
        ch = low if len(low) == 1 else ch  # simple (1:1) lowercase mapping only
        cjk = any(a <= cp <= b for a, b in _CJK_RANGES)
        if cat[0] == "P" or (cp < 0x7F and cat[0] == "S") or cjk:
            if cur:
                words.append("".join(cur))
                cur = []
            words.append(ch)
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    return words
