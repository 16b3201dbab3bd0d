//! The phrases `/describe` ranks, shipped with the bot (`assets/describe/`, sources and licences
//! in the README): one list per kind of phrase.

/// A kind of phrase, in the order a suggested prompt uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// What the picture shows: "a castle on a hill".
    Subject,
    /// How it was made: "a charcoal drawing".
    Medium,
    /// A (no longer living) artist whose style it recalls.
    Artist,
    /// An art movement: "art nouveau".
    Movement,
    /// A descriptor from prompts people write: "highly detailed".
    Flavor,
    /// The light: "golden hour".
    Lighting,
    /// The colours: "teal and orange".
    Colour,
}

impl Kind {
    /// Every kind, in the order of [`KINDS_TEXT`].
    pub(crate) const ALL: [Kind; 7] = [
        Kind::Subject,
        Kind::Medium,
        Kind::Artist,
        Kind::Movement,
        Kind::Flavor,
        Kind::Lighting,
        Kind::Colour,
    ];
}

/// Each kind's data file, in [`Kind::ALL`]'s order.
const KINDS_TEXT: [&str; 7] = [
    include_str!("../../assets/describe/subjects.txt"),
    include_str!("../../assets/describe/mediums.txt"),
    include_str!("../../assets/describe/artists.txt"),
    include_str!("../../assets/describe/movements.txt"),
    include_str!("../../assets/describe/flavors.txt"),
    include_str!("../../assets/describe/lighting.txt"),
    include_str!("../../assets/describe/colours.txt"),
];

/// Every phrase, each with its kind, in [`Kind::ALL`]'s order and each file's.
pub(crate) fn phrases() -> Vec<(Kind, &'static str)> {
    Kind::ALL
        .iter()
        .zip(KINDS_TEXT)
        .flat_map(|(&kind, text)| {
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(move |line| (kind, line))
        })
        .collect()
}

/// All the data files' text, for the embedding cache's key: a changed list is embedded again.
pub(crate) fn fingerprint_text() -> impl Iterator<Item = &'static str> {
    KINDS_TEXT.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_is_there_a_few_thousand_phrases_in_all_none_twice_in_a_list() {
        let all = phrases();
        assert!((2000..6000).contains(&all.len()), "{} phrases", all.len());
        for kind in Kind::ALL {
            let mine: Vec<&str> = all
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, p)| *p)
                .collect();
            assert!(mine.len() >= 50, "{kind:?}: {}", mine.len());
            let mut unique = mine.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), mine.len(), "{kind:?} repeats a phrase");
            // A phrase becomes part of a prompt: no flag or separator may hide in it.
            for phrase in mine {
                assert!(
                    !phrase.contains("--") && !phrase.contains('|') && !phrase.contains('`'),
                    "{phrase}"
                );
                assert!(phrase.chars().count() <= 60, "{phrase}");
            }
        }
    }
}
