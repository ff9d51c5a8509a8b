"""Benign twins of harmful prompts: the fixed word list and its substitution.

The probe's benign class includes its own AdvBench prompts with their harmful words swapped
(the same sentence frame, benign intent: the paper's recipe), so a probe cannot separate the
classes by AdvBench's phrasing alone.
"""

from __future__ import annotations

import re

# Harmful word or phrase -> benign stand-in, applied in this order, whole words, case-insensitive
# (the first letter's case is kept). Phrases come before their words ("hack into" before
# "hack"). Fixed in code so the substituted prompts are the same on every machine and run; a
# prompt with no listed word gets no twin. This is a lexical recipe: the twins are benign in
# intent for the words listed, not reviewed by hand one by one.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("without their consent", "with their consent"),
    ("without user consent", "with user consent"),
    ("hack into", "log into"),
    ("hacking into", "logging into"),
    ("break into", "walk into"),
    ("commit suicide", "plan a picnic"),
    ("self-harm", "self-care"),
    ("identity theft", "identity verification"),
    ("insider trading", "index investing"),
    ("hate speech", "kind words"),
    ("fake news", "local news"),
    ("credit card fraud", "credit card budgeting"),
    ("illegal drugs", "herbal teas"),
    ("hack", "update"),
    ("hacking", "updating"),
    ("hacks", "updates"),
    ("steal", "borrow"),
    ("steals", "borrows"),
    ("stealing", "borrowing"),
    ("bomb", "cake"),
    ("bombs", "cakes"),
    ("explosive", "decorative"),
    ("explosives", "decorations"),
    ("weapon", "garden tool"),
    ("weapons", "garden tools"),
    ("firearms", "fishing rods"),
    ("poison", "season"),
    ("poisoning", "seasoning"),
    ("toxins", "spices"),
    ("kill", "greet"),
    ("killing", "greeting"),
    ("murder", "surprise"),
    ("assassinate", "interview"),
    ("suicide", "gardening"),
    ("drugs", "vitamins"),
    ("drug", "vitamin"),
    ("virus", "newsletter"),
    ("viruses", "newsletters"),
    ("malware", "software"),
    ("ransomware", "backup software"),
    ("phishing", "welcome"),
    ("scam", "raffle"),
    ("scams", "raffles"),
    ("fraud", "budgeting"),
    ("fraudulent", "honest"),
    ("fake", "accurate"),
    ("false", "true"),
    ("misinformation", "information"),
    ("propaganda", "tutorials"),
    ("manipulate", "encourage"),
    ("manipulating", "encouraging"),
    ("violence", "kindness"),
    ("violent", "friendly"),
    ("terrorist", "volunteer"),
    ("terrorism", "volunteering"),
    ("attack", "visit"),
    ("attacks", "visits"),
    ("harm", "help"),
    ("harass", "thank"),
    ("cyberbully", "compliment"),
    ("illegal", "legal"),
    ("illegally", "legally"),
    ("theft", "donation"),
    ("cheat", "study"),
    ("exploit", "document"),
    ("evade", "follow"),
    ("dangerous", "safe"),
    ("sensitive", "public"),
    ("confidential", "published"),
    ("destroy", "repair"),
    ("damage", "improve"),
    ("crash", "start"),
    ("panic", "calm"),
    ("chaos", "order"),
    ("racism", "respect"),
    ("hatred", "friendship"),
    ("hate", "love"),
    ("counterfeit", "handmade"),
    ("launder", "donate"),
    ("smuggle", "deliver"),
    ("ddos", "backup"),
    ("spyware", "accessibility software"),
    ("assault", "hug"),
    ("anorexia", "yoga"),
    ("bulimia", "pilates"),
    ("crack", "reset"),
    ("pirate", "buy"),
    ("pirated", "licensed"),
    ("pornography", "photography"),
    ("threatening", "thank-you"),
    ("threatens", "thanks"),
    ("cyberbullying", "mentoring"),
    ("cyberbullies", "mentors"),
    ("bullying", "mentoring"),
    ("harassment", "encouragement"),
    ("harasses", "encourages"),
    ("hijack", "inspect"),
    ("oppression", "celebration"),
    ("dehumanization", "appreciation"),
    ("crimes", "good deeds"),
    ("crime", "good deed"),
    ("criminal", "community"),
    ("falsify", "update"),
    ("infiltrate", "tour"),
    ("spy", "report"),
    ("spies", "reports"),
    ("racist", "fair"),
    ("sexist", "balanced"),
    ("concealing", "reporting"),
    ("circumvent", "understand"),
    ("cyberstalk", "congratulate"),
    ("cyberattack", "fundraiser"),
    ("deadly", "mild"),
    ("sabotaging", "supporting"),
    ("sabotage", "support"),
    ("radicalization", "education"),
    ("deletes", "restores"),
    ("extremist", "community"),
    ("torture", "tickle"),
    ("abuse", "care"),
    ("blackmail", "birthday"),
    ("extort", "thank"),
    ("counterfeiting", "crafting"),
    ("vandalize", "paint"),
    ("lock", "flower"),
)


def substitute_harmful_words(prompt: str) -> tuple[str, int]:
    """(prompt with the SUBSTITUTIONS applied, number of replacements); deterministic."""
    total = 0
    for word, stand_in in SUBSTITUTIONS:

        def keep_case(match: re.Match, stand_in: str = stand_in) -> str:
            return stand_in[0].upper() + stand_in[1:] if match.group(0)[0].isupper() else stand_in

        prompt, n = re.subn(rf"\b{re.escape(word)}\b", keep_case, prompt, flags=re.IGNORECASE)
        total += n
    return prompt, total
