//! Bulk deletes through the layer stack.
//!
//! `object_store` deletes through `delete_stream`, and its S3 backend sends one
//! `DeleteObjects` request per 1,000 keys. Every layer of the stack (see [`crate::stack`])
//! therefore handles a delete stream in batches of [`DELETE_BATCH`] paths and hands each
//! batch on to the layer below as one stream, so a batch stays one request all the way down:
//! the retry layer sends again, as one smaller batch, the keys that failed transiently
//! (S3 answers per key; deletes are idempotent, and a missing key is not an error), or the
//! whole batch when the request itself failed; the limits layer takes one permit per batch, the statistics layer counts one
//! delete request per batch, and the fault layer decides each key's fault before the batch
//! goes on. A failed batch yields one error in place of its keys' results, so a caller
//! counts what was confirmed and stops at the first error.
//!
//! Stateless: no state survives a crash; dropping the stream cancels the batch in flight.

use std::future::Future;
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::ObjectStore;

use crate::retry::{Classified, Retry};

/// Keys per batch: the most one S3 `DeleteObjects` request takes.
pub const DELETE_BATCH: usize = 1000;

/// `locations` in batches of [`DELETE_BATCH`]: each run of paths goes to `each`, errors
/// already in the stream pass through, and the results keep the order of the input (every
/// layer keeps it, so a caller can match results to the keys it sent).
pub(crate) fn batched<F, Fut>(
    locations: BoxStream<'static, object_store::Result<Path>>,
    each: F,
) -> BoxStream<'static, object_store::Result<Path>>
where
    F: Fn(Vec<Path>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<object_store::Result<Path>>> + Send + 'static,
{
    let each = Arc::new(each);
    locations
        .chunks(DELETE_BATCH)
        .then(move |items| {
            let each = Arc::clone(&each);
            async move {
                let mut out = Vec::with_capacity(items.len());
                let mut paths = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Ok(p) => paths.push(p),
                        Err(e) => {
                            if !paths.is_empty() {
                                out.extend(each(std::mem::take(&mut paths)).await);
                            }
                            out.push(Err(e));
                        }
                    }
                }
                if !paths.is_empty() {
                    out.extend(each(paths).await);
                }
                stream::iter(out)
            }
        })
        .flatten()
        .boxed()
}

/// Hands `paths` to `inner` as one delete stream and collects its results.
pub(crate) async fn forward(
    inner: &Arc<dyn ObjectStore>,
    paths: Vec<Path>,
) -> Vec<object_store::Result<Path>> {
    inner
        .delete_stream(stream::iter(paths).map(Ok).boxed())
        .collect()
        .await
}

/// Deletes `paths` through `inner`, sending again the keys whose deletion failed
/// transiently, on one retry budget for the batch. Results keep the order of `paths`; when
/// the budget is spent, the keys still failing get one error (the last) in their place.
pub(crate) async fn retried(
    inner: &Arc<dyn ObjectStore>,
    retry: &Arc<Retry>,
    paths: Vec<Path>,
) -> Vec<object_store::Result<Path>> {
    let target = paths.first().map(|p| p.to_string()).unwrap_or_default();
    let mut answers: Vec<Option<object_store::Result<Path>>> = Vec::new();
    answers.resize_with(paths.len(), || None);
    let mut pending: Vec<usize> = (0..paths.len()).collect();
    let mut budget = retry.budget();
    loop {
        let sent: Vec<Path> = pending.iter().map(|&i| paths[i].clone()).collect();
        let got = forward(inner, sent).await;
        let mut again = Vec::new();
        let mut last = None;
        if got.len() == pending.len() {
            for (&i, r) in pending.iter().zip(got) {
                match r {
                    Err(e) if e.transient_cause().is_some() => {
                        again.push(i);
                        last = Some(e);
                    }
                    r => answers[i] = Some(r),
                }
            }
        } else {
            // The request itself failed: one error stands for the batch.
            match got.into_iter().find_map(Result::err) {
                Some(e) if e.transient_cause().is_some() => {
                    again = pending.clone();
                    last = Some(e);
                }
                Some(e) => {
                    return settled(answers, Some(e));
                }
                None => again = pending.clone(),
            }
        }
        let Some(e) = last else {
            return settled(answers, None);
        };
        pending = again;
        if !budget.wait("delete", &target, &e).await {
            return settled(
                answers,
                Some(budget.give_up("delete", &target, e).into_error()),
            );
        }
    }
}

/// The answers in order up to the first key without one, which gets `failure`.
fn settled(
    answers: Vec<Option<object_store::Result<Path>>>,
    failure: Option<object_store::Error>,
) -> Vec<object_store::Result<Path>> {
    let mut out = Vec::with_capacity(answers.len());
    let mut failure = failure;
    for a in answers {
        match a {
            Some(r) => out.push(r),
            None => match failure.take() {
                Some(e) => {
                    out.push(Err(e));
                    break;
                }
                None => break,
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn batches_hold_at_most_the_bulk_limit_and_errors_pass_through() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let items: Vec<object_store::Result<Path>> = (0..2500)
            .map(|i| {
                if i == 7 {
                    Err(object_store::Error::NotImplemented {
                        operation: "test".into(),
                        implementer: "test".into(),
                    })
                } else {
                    Ok(Path::from(format!("k{i}")))
                }
            })
            .collect();
        let out: Vec<_> = batched(stream::iter(items).boxed(), move |paths| {
            seen.lock().unwrap().push(paths.len());
            async move { paths.into_iter().map(Ok).collect() }
        })
        .collect()
        .await;
        assert_eq!(*sizes.lock().unwrap(), vec![7, 992, 1000, 500]);
        assert_eq!(out.len(), 2500);
        for (i, r) in out.iter().enumerate() {
            match r {
                Ok(p) => assert_eq!(p.as_ref(), format!("k{i}")),
                Err(_) => assert_eq!(i, 7),
            }
        }
    }
}
