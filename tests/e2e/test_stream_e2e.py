"""Unit tests of stream_e2e.py's checks: python -m unittest discover -s tests/e2e -p 'test_*.py'
(stream_e2e.py needs `websockets`: run with the venv of scripts/stt-venv.sh.)"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import stream_e2e  # noqa: E402
except ModuleNotFoundError as e:  # system python without the venv's websockets
    stream_e2e = None
    missing = str(e)


def final(start, end, words=()):
    return {
        "type": "transcript", "utterance_id": 0, "channel": 0, "start": start, "end": end,
        "text": " ".join(w for w, _, _ in words), "is_final": True,
        "words": [{"word": w, "start": s, "end": e} for w, s, e in words],
    }


@unittest.skipIf(stream_e2e is None, "stream_e2e.py needs websockets (the e2e venv)")
class StreamTimeTest(unittest.TestCase):
    def test_a_final_inside_its_file_passes(self):
        self.assertEqual(stream_e2e.check_stream_time("s01", final(0.0, 3.2), 3.2), [])
        self.assertEqual(stream_e2e.check_stream_time("s01", final(0.4, 3.2 + 0.04), 3.2), [])

    def test_a_final_outside_its_file_fails(self):
        # Connection time counted twice, or a seconds/frames mix-up: outside.
        self.assertEqual(len(stream_e2e.check_stream_time("s01", final(3.3, 4.0), 3.2)), 1)
        self.assertEqual(len(stream_e2e.check_stream_time("s01", final(-0.2, 1.0), 3.2)), 1)
        self.assertEqual(len(stream_e2e.check_stream_time("s01", final(1.0, 3.3), 3.2)), 1)
        self.assertEqual(len(stream_e2e.check_stream_time("s01", final(2.0, 1.0), 3.2)), 1)


@unittest.skipIf(stream_e2e is None, "stream_e2e.py needs websockets (the e2e venv)")
class WordsTest(unittest.TestCase):
    def test_words_inside_their_final_pass(self):
        f = final(0.0, 1.0, [("hello", 0.1, 0.4), ("there", 0.5, 0.9)])
        self.assertEqual(stream_e2e.check_words("s", f), [])

    def test_words_outside_or_missing_fail(self):
        f = final(0.0, 1.0, [("hello", 0.1, 0.4), ("there", 0.5, 1.5)])
        self.assertEqual(len(stream_e2e.check_words("s", f)), 1)
        f = final(0.0, 1.0, [("hello", 0.1, 0.4)])
        del f["words"]
        self.assertEqual(len(stream_e2e.check_words("s", f)), 1)


if __name__ == "__main__":
    unittest.main()
