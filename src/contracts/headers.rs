use std::fmt;
use std::sync::Arc;

type List = Vec<(String, Vec<u8>)>;

/// Record headers, in order, as Kafka carries them (a name may repeat).
///
/// A small owned type so contracts and handlers never see a transport's header type. Shared
/// on clone and copied on the first write after one: a record's headers are cloned on their
/// way through the framework (the memory bus's log, retries, dead letters) far more often than
/// they are changed, and a deep copy cost three allocations per record.
#[derive(Clone, Default)]
pub struct Headers(Option<Arc<List>>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self(None)
    }

    fn list(&self) -> &[(String, Vec<u8>)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    fn list_mut(&mut self) -> &mut List {
        Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }

    /// Appends a header, keeping any earlier one of the same name.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.list_mut().push((name.into(), value.into()));
    }

    /// Builder form of [`insert`](Self::insert).
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.insert(name, value);
        self
    }

    /// Replaces every header of this name by one with `value`.
    pub fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        let list = self.list_mut();
        list.retain(|(n, _)| n != name);
        list.push((name.to_owned(), value.into()));
    }

    /// The last value of a header (the one a later writer meant), if any.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.list()
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The last value of a header as UTF-8 text, if present and valid.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All headers, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.list().iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.list().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.list()
                    .iter()
                    .map(|(n, v)| (n, String::from_utf8_lossy(v).into_owned())),
            )
            .finish()
    }
}

impl<N: Into<String>, V: Into<Vec<u8>>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let list: List = iter
            .into_iter()
            .map(|(n, v)| (n.into(), v.into()))
            .collect();
        Self((!list.is_empty()).then(|| Arc::new(list)))
    }
}

/// Equal when they hold the same headers in the same order, shared or not.
impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.list() == other.list()
    }
}

impl Eq for Headers {}
