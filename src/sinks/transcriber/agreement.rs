//! LocalAgreement-2: which words of a growing utterance's hypotheses are
//! stable.
//!
//! Each partial re-transcribes the open utterance from its start, so the
//! engine may revise its last words as more audio arrives. The words that
//! two hypotheses in a row agree on, from the first word on, are taken as
//! settled (whisper_streaming's policy with n = 2) and are never retracted:
//! the stable prefix only grows, even when a later hypothesis disagrees with
//! it. Pure: no IO, no clock.

/// One utterance's agreement state.
#[derive(Debug, Default)]
pub struct LocalAgreement {
    /// The words confirmed so far, as first confirmed.
    stable: Vec<String>,
    /// The previous hypothesis, as words.
    previous: Vec<String>,
}

impl LocalAgreement {
    /// Takes the next hypothesis; returns the stable text after it.
    pub fn push(&mut self, hypothesis: &str) -> String {
        let words: Vec<String> = hypothesis.split_whitespace().map(str::to_owned).collect();
        let agreed = self
            .previous
            .iter()
            .zip(&words)
            .take_while(|(a, b)| same_word(a, b))
            .count();
        // Only words past what is already stable can be added, and only
        // when this hypothesis still starts with the stable words (else the
        // two hypotheses agree on something that contradicts them).
        let consistent = self.stable.len() <= agreed
            && self.stable.iter().zip(&words).all(|(a, b)| same_word(a, b));
        if consistent && agreed > self.stable.len() {
            let new_words = words[self.stable.len()..agreed].iter().cloned();
            self.stable.extend(new_words);
        }
        self.previous = words;
        self.stable_text()
    }

    pub fn stable_text(&self) -> String {
        self.stable.join(" ")
    }
}

/// Words compare without case and trailing punctuation: an engine that
/// writes "today" then "today." agrees with itself.
fn same_word(a: &str, b: &str) -> bool {
    let trim = |w: &str| {
        w.trim_matches(|c: char| c.is_ascii_punctuation())
            .to_lowercase()
    };
    trim(a) == trim(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(hypotheses: &[&str]) -> Vec<String> {
        let mut agreement = LocalAgreement::default();
        hypotheses.iter().map(|h| agreement.push(h)).collect()
    }

    #[test]
    fn the_first_hypothesis_alone_is_not_stable() {
        assert_eq!(run(&["hello there"]), [""]);
    }

    #[test]
    fn the_common_prefix_of_the_last_two_hypotheses_becomes_stable() {
        assert_eq!(
            run(&[
                "the whether",
                "the weather is",
                "the weather is nice to",
                "the weather is nice today so",
            ]),
            ["", "the", "the weather is", "the weather is nice"]
        );
    }

    #[test]
    fn stable_words_are_never_retracted() {
        let stable = run(&[
            "please call me",
            "please call me back",
            // The engine changes its mind about the stable words: they stay,
            // and nothing new is confirmed from a contradicting pair.
            "please fall me back when",
            "please fall me back when you",
            "please call me back when you get",
            "please call me back when you get home",
        ]);
        assert_eq!(
            stable,
            [
                "",
                "please call me",
                "please call me",
                "please call me",
                "please call me",
                "please call me back when you get"
            ]
        );
        for pair in stable.windows(2) {
            assert!(pair[1].starts_with(pair[0].as_str()), "{pair:?}");
        }
    }

    #[test]
    fn case_and_trailing_punctuation_do_not_break_agreement() {
        assert_eq!(
            run(&["Hello, world", "hello world again"]),
            // As the newer hypothesis writes them.
            ["", "hello world"]
        );
    }

    #[test]
    fn an_empty_hypothesis_confirms_nothing_and_loses_nothing() {
        assert_eq!(
            run(&["a b", "a b c", "", "a b c"]),
            ["", "a b", "a b", "a b"]
        );
    }
}
