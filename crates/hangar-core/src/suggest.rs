//! Closest names, for "did you mean" answers.

/// Levenshtein distance between two strings, by characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Up to `limit` candidates closest to `wanted`, nearest first, ties by name. Candidates
/// that share a prefix or contain `wanted` count as close; far-off ones are left out.
pub fn closest<'a>(
    wanted: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    limit: usize,
) -> Vec<String> {
    let wanted_lower = wanted.to_lowercase();
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .filter_map(|candidate| {
            let lower = candidate.to_lowercase();
            let distance = edit_distance(&wanted_lower, &lower);
            let related = lower.contains(&wanted_lower) || wanted_lower.contains(&lower);
            let near = distance <= wanted.chars().count().max(3).div_ceil(2);
            (related || near).then_some((if related { 0 } else { distance }, candidate))
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(limit)
        .map(|(_, name)| name.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("redis", "redis"), 0);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn closest_names_first_and_far_ones_dropped() {
        let names = ["http-static", "http-counter", "redis", "postgresql"];
        assert_eq!(closest("http-statc", names, 3), vec!["http-static"]);
        assert_eq!(closest("rdeis", names, 3), vec!["redis"]);
        assert_eq!(
            closest("http", names, 3),
            vec!["http-counter", "http-static"]
        );
        assert!(closest("zzzzzz", names, 3).is_empty());
    }
}
