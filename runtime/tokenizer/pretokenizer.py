"""BPE pre-tokenizers: llama.cpp's regex sets per `tokenizer.ggml.pre`, applied the way llama.cpp applies them.

llama.cpp (unicode.cpp, `unicode_regex_split`) runs each regex of a set over the pieces the
previous one produced; text a regex does not match stays a piece of its own. Regexes that use
Unicode categories (\\p{L}, \\p{N}, ...) are run by std::regex on a "collapsed" copy of the text
in which every non-ASCII code point becomes one stand-in character for its category (0xD1
number, 0xD2 letter, 0xD3 punctuation, 0xD4 mark, 0xD5 symbol, 0x0B whitespace, 0xD0 other) and
each \\p{X} in the regex becomes a class of that stand-in plus the ASCII members of X. We do
exactly the same with Python's `re` (ASCII mode, so \\s is ECMAScript's ASCII whitespace), which
keeps llama.cpp's quirks (e.g. its ASCII \\p{S} lacks '~') and runs in C at regex speed. The
hand-written GPT-2 and Llama-3 splitters llama.cpp uses for two of these regexes are equivalent
to the regexes themselves, so they need no special case here.

Categories come from `unicodedata` (as llama.cpp's tables come from UnicodeData.txt), and the
whitespace set is llama.cpp's (Unicode White_Space).
"""

from __future__ import annotations

import re
import unicodedata
import warnings

# --- the regex sets (llama-vocab.cpp, llm_tokenizer_bpe) ------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# escaped: editors and copy-paste normalize some of these letters (e.g. U+1F7D, U+212A) away
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

REGEX_SETS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "deepseek-llm": ("[\r\n]", _DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", "\\s+$", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}+"),
    "deepseek3-llm": (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _GPT2),
    "gpt2": (_GPT2,),
    "qwen2": (_QWEN2,),
    "poro": (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",),
    "chatglm4": (_LLAMA3,),
    "viking": (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+", r"\p{N}"),
    "tekken": (_TEKKEN,),
    "chameleon": (
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        "([\\t\\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2,
    ),
    "gpt4o": (_GPT4O,),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "seed-coder": (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "superbpe": (r"\p{N}+", r"(?=(\d{3})+(?!\d))"),
}


class PreTokenizerInfo:
    """What a `tokenizer.ggml.pre` name means in llama.cpp: the regex set and the flags it sets."""

    __slots__ = ("regex_set", "ignore_merges", "clean_spaces", "add_bos")

    def __init__(self, regex_set, ignore_merges=False, clean_spaces=True, add_bos=None):
        self.regex_set = regex_set
        self.ignore_merges = ignore_merges
        self.clean_spaces = clean_spaces
        self.add_bos = add_bos  # llama.cpp's default before the metadata's add_bos_token applies


def _info(regex_set, **kw):
    return PreTokenizerInfo(regex_set, **kw)


# tokenizer.ggml.pre -> llama.cpp's pre type (llama-vocab.cpp, llama_vocab::impl::load)
PRE_TOKENIZERS: dict[str, PreTokenizerInfo] = {
    "default": _info("default"),
    **{n: _info("llama3", ignore_merges=True, add_bos=True) for n in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")},
    "deepseek-llm": _info("deepseek-llm", clean_spaces=False),
    "deepseek-coder": _info("deepseek-coder", clean_spaces=False),
    "deepseek-v3": _info("deepseek3-llm", clean_spaces=False),
    "falcon": _info("falcon"),
    "mpt": _info("gpt2"),
    "starcoder": _info("starcoder"),
    **{n: _info("gpt2") for n in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
        "mellum", "exaone4", "jina-v1-en", "jina-v2-code", "roberta-bpe", "olmo", "jais")},
    "refact": _info("starcoder"),
    "command-r": _info("starcoder", clean_spaces=False),
    **{n: _info("qwen2", clean_spaces=False) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "hunyuan")},
    "megrez": _info("qwen2"),
    "stablelm2": _info("qwen2"),
    "dbrx": _info("llama3"),
    "smaug-bpe": _info("llama3"),
    "poro-chat": _info("poro", clean_spaces=False),
    "bloom": _info("poro"),
    "gpt3-finnish": _info("poro"),
    "glm4": _info("chatglm4"),
    "chatglm-bpe": _info("chatglm4"),
    "viking": _info("viking", clean_spaces=False),
    "tekken": _info("tekken", ignore_merges=True, clean_spaces=False, add_bos=True),
    "smollm": _info("starcoder", clean_spaces=False),
    "codeshell": _info("starcoder"),
    "exaone": _info("starcoder"),
    "minerva-7b": _info("starcoder"),
    "chameleon": _info("chameleon", clean_spaces=False, add_bos=True),
    **{n: _info("gpt4o", clean_spaces=False) for n in ("gpt-4o", "llama4")},
    "trillion": _info("gpt2", clean_spaces=False),
    "granite-docling": _info("gpt2", clean_spaces=False),
    **{n: _info("bailingmoe", clean_spaces=False) for n in ("bailingmoe", "bailingmoe2", "llada-moe")},
    "seed-coder": _info("seed-coder", clean_spaces=False),
    "superbpe": _info("superbpe", clean_spaces=False),
}


# --- llama.cpp's collapsed representation ------------------------------------------------------

WHITESPACE = frozenset(
    list(range(0x09, 0x0E)) + [0x20, 0x85, 0xA0, 0x1680] + list(range(0x2000, 0x200B)) + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
_CATEGORY_STANDIN = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
# \p{X} -> stand-in + the ASCII members llama.cpp lists for X (unicode.cpp, k_ucat_map)
_UCAT = {
    r"\p{N}": ("N", "0-9"),
    r"\p{L}": ("L", "A-Za-z"),
    r"\p{P}": ("P", "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}"),
    r"\p{M}": ("M", ""),
    r"\p{S}": ("S", "\\$\\+<->^`\\|"),
    r"\p{Lu}": ("L", "A-Za-z"),
    r"\p{Ll}": ("L", "A-Za-z"),
    r"\p{Lt}": ("L", "A-Za-z"),
    r"\p{Lm}": ("L", "A-Za-z"),
    r"\p{Lo}": ("L", "A-Za-z"),
}


class _CollapseTable(dict):
    """str.translate table: ASCII stays, other code points become their category's stand-in."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            ch = chr(cp)
        elif cp in WHITESPACE:
            ch = "\x0b"
        else:
            ch = _CATEGORY_STANDIN.get(unicodedata.category(chr(cp))[0], "\xd0")
        self[cp] = ch
        return ch


class _WhitespaceTable(dict):
    """str.translate table for regexes without categories: only non-ASCII whitespace -> 0x0B."""

    def __missing__(self, cp: int) -> str:
        ch = "\x0b" if cp >= 128 and cp in WHITESPACE else chr(cp)
        self[cp] = ch
        return ch


_COLLAPSE = _CollapseTable()
_WS_ONLY = _WhitespaceTable()


def uses_categories(regex: str) -> bool:
    return any(k in regex for k in _UCAT)


def collapse_regex(regex: str) -> str:
    """llama.cpp's rewrite of a regex for the collapsed text (same scan, same quirks)."""
    out = []
    inside = False
    i = 0
    n = len(regex)
    while i < n:
        c = regex[i]
        if c == "[" and (i == 0 or regex[i - 1] != "\\"):
            out.append("[")
            inside = True
            i += 1
            continue
        if inside and c == "]" and regex[i - 1] != "\\":
            out.append("]")
            inside = False
            i += 1
            continue
        if c == "\\" and i + 3 < n and regex[i + 1] == "p" and regex[i + 2] == "{":
            close = regex.find("}", i + 3)
            if close != -1 and close <= i + 10:
                pat = regex[i : close + 1]
                if pat in _UCAT:
                    cat, ascii_members = _UCAT[pat]
                    body = _CATEGORY_STANDIN[cat] + ascii_members
                    out.append(body if inside else "[" + body + "]")
                    i = close + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


def _rewrite_outside_classes(regex: str, rewrite) -> str:
    """Copy a regex, escapes (`\\x`) and character classes (`[...]`) as they are; every other
    character regex[i] becomes rewrite(regex, i) (a string)."""
    out = []
    inside = False
    i = 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            out.append(regex[i : i + 2])
            i += 2
            continue
        if c == "[":
            inside = True
        elif c == "]":
            inside = False
        elif not inside:
            c = rewrite(regex, i)
        out.append(c)
        i += 1
    return "".join(out)


def _ecmascript_to_python(regex: str) -> str:
    """The few ECMAScript spellings Python reads differently: `$` is only the end of input."""
    return _rewrite_outside_classes(regex, lambda r, i: r"\Z" if r[i] == "$" else r[i])


def _uncapture(regex: str) -> str:
    """Make every group non-capturing, so that re.split with one outer group returns exactly
    gap, match, gap, match, ..."""
    return _rewrite_outside_classes(regex, lambda r, i: "(?:" if r[i] == "(" and not r.startswith("?", i + 1) else r[i])


class _CompiledRegex:
    __slots__ = ("split", "collapsed")

    def __init__(self, regex: str):
        self.collapsed = uses_categories(regex)
        source = collapse_regex(regex) if self.collapsed else regex
        source = "(" + _uncapture(_ecmascript_to_python(source)) + ")"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "possible nested set" notes
            self.split = re.compile(source, re.ASCII).split


class PreTokenizer:
    """Splits text into the words BPE merges within, for one regex set."""

    def __init__(self, regex_set: str):
        self.name = regex_set
        self.regexes = [_CompiledRegex(r) for r in REGEX_SETS[regex_set]]

    def split(self, text: str) -> list[str]:
        """The words of `text`: each regex cuts every piece into its matches and the text
        between them (re.split with one group gives exactly that, empty strings aside)."""
        if not text:
            return []
        pieces = [text]
        for rx in self.regexes:
            split = rx.split
            table = _COLLAPSE if rx.collapsed else _WS_ONLY
            out: list[str] = []
            for piece in pieces:
                if piece.isascii():
                    out.extend(filter(None, split(piece)))
                    continue
                subject = piece.translate(table)  # same length: one character per code point
                parts = split(subject)
                if subject == piece:
                    out.extend(filter(None, parts))
                    continue
                pos = 0
                for part in parts:
                    if part:
                        end = pos + len(part)
                        out.append(piece[pos:end])
                        pos = end
            pieces = out
        return pieces
