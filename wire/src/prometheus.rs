//! Reading engine metrics: the gateway scrapes them for load, the engine's tests read back what
//! it renders.

/// Reads one sample `name` from Prometheus text (first series).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_series_of_a_name_and_not_its_prefixes() {
        let text =
            "# HELP a_total x\na_total{x=\"1\"} 3\na_total{x=\"2\"} 4\na_total_more 9\nb 1.5\n";
        assert_eq!(sample(text, "a_total"), Some(3.0));
        assert_eq!(sample(text, "b"), Some(1.5));
        assert_eq!(
            sample(text, "a"),
            None,
            "a prefix of a name is not the name"
        );
        assert_eq!(sample(text, "c"), None);
    }
}
