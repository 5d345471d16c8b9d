"""Unit tests of wer.py: python3 -m unittest discover -s tests/e2e -p 'test_*.py'"""

import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import wer  # noqa: E402


class NormalizeTest(unittest.TestCase):
    def test_case_and_punctuation(self):
        self.assertEqual(wer.normalize("Hello, World! Don't stop."), ["hello", "world", "don't", "stop"])

    def test_numbers(self):
        self.assertEqual(wer.normalize("42"), ["forty", "two"])
        self.assertEqual(wer.normalize("call 555-1234"), ["call", "five", "hundred", "fifty", "five", "one", "thousand", "two", "hundred", "thirty", "four"])
        self.assertEqual(wer.normalize("1,000 and 3.5"), ["one", "thousand", "and", "three", "point", "five"])
        self.assertEqual(wer.normalize("at 3pm"), ["at", "three", "pm"])
        self.assertEqual(wer.normalize("100"), ["one", "hundred"])
        self.assertEqual(wer.normalize("2024"), ["two", "thousand", "twenty", "four"])
        self.assertEqual(wer.normalize("0"), ["zero"])

    def test_hyphens_and_markers(self):
        self.assertEqual(wer.normalize("twenty-one <sil> [noise] the(2) end"), ["twenty", "one", "the", "end"])

    def test_curly_apostrophe(self):
        self.assertEqual(wer.normalize("don\u2019t"), ["don't"])

    def test_empty(self):
        self.assertEqual(wer.normalize("  ...  "), [])


class EditCountsTest(unittest.TestCase):
    def test_identical(self):
        c = wer.score("the cat sat", "The cat, sat.")
        self.assertEqual((c.errors, c.ref_words, c.accuracy), (0, 3, 1.0))

    def test_kinds(self):
        c = wer.edit_counts("a b c d".split(), "a x c d e".split())
        self.assertEqual((c.substitutions, c.deletions, c.insertions), (1, 0, 1))
        c = wer.edit_counts("a b c d".split(), "a d".split())
        self.assertEqual((c.substitutions, c.deletions, c.insertions), (0, 2, 0))
        self.assertAlmostEqual(c.wer, 0.5)

    def test_insertions_can_make_accuracy_negative(self):
        c = wer.score("yes", "no no no")
        self.assertEqual(c.errors, 3)
        self.assertAlmostEqual(c.accuracy, -2.0)

    def test_empty_reference(self):
        self.assertEqual(wer.wer("", ""), 0.0)
        self.assertEqual(wer.wer("", "something"), 1.0)
        self.assertEqual(wer.wer("two words", ""), 1.0)

    def test_corpus_is_pooled_not_averaged(self):
        total = wer.corpus([("a b c d e f g h i j", "a b c d e f g h i j"), ("x", "y")])
        # 1 error over 11 words, not the mean of 1.0 and 0.0.
        self.assertEqual((total.errors, total.ref_words), (1, 11))
        self.assertAlmostEqual(total.accuracy, 10 / 11)

    def test_minimum_distance(self):
        # Classic example: kitten -> sitting as letters is 3 edits.
        c = wer.edit_counts(list("kitten"), list("sitting"))
        self.assertEqual(c.errors, 3)


class CliTest(unittest.TestCase):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wer.py")

    def test_threshold_exit_code(self):
        ok = subprocess.run([sys.executable, self.script, "a b c d", "a b c d", "--min-accuracy", "0.9"], capture_output=True, text=True)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertIn('"word_accuracy": 1.0', ok.stdout)
        bad = subprocess.run([sys.executable, self.script, "a b c d", "a b x d", "--min-accuracy", "0.9"], capture_output=True, text=True)
        self.assertEqual(bad.returncode, 1)
        self.assertIn('"word_accuracy": 0.75', bad.stdout)

    def test_pairs_from_stdin(self):
        run = subprocess.run([sys.executable, self.script, "--pairs", "-"], input="a b\ta b\nc d\tc\n", capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn('"pairs": 2', run.stdout)
        self.assertIn('"errors": 1', run.stdout)


if __name__ == "__main__":
    unittest.main()
