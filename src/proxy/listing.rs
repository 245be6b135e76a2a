//! `GET /v1/chat/completions`: the stored completions of a client span the
//! accounts of every key that created one. The list asks each of those
//! accounts for a page (through a lease, paced like any request), keeps
//! only the objects this client created, and merges them in creation order.
//! Cursors stay exact across pages: for `after=X` each account continues
//! from this client's object in it nearest to X, which the book knows.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use sidecar_actors::affinity::Owner;

use sidecar_actors::Priority;

use super::prepare::{authenticate, client_priority};
use super::{proxy, Endpoint, Input, ProxyState};
use crate::web::error::ApiError;

const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

/// The list's own parameters; the rest (`model`, `metadata[…]`) go to
/// every account as they came.
struct ListQuery {
    limit: usize,
    descending: bool,
    after: Option<String>,
    rest: Vec<(String, String)>,
}

impl ListQuery {
    fn parse(query: &str) -> Result<Self, ApiError> {
        let mut q = ListQuery {
            limit: DEFAULT_LIMIT,
            descending: false,
            after: None,
            rest: Vec::new(),
        };
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "limit" => {
                    q.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::InvalidRequest(format!(
                                "limit must be a whole number from 1 to {MAX_LIMIT}"
                            ))
                        })?;
                }
                "order" => {
                    q.descending = match &*v {
                        "asc" => false,
                        "desc" => true,
                        _ => {
                            return Err(ApiError::InvalidRequest(
                                "order must be asc or desc".into(),
                            ))
                        }
                    }
                }
                "after" => q.after = Some(v.into_owned()),
                _ => q.rest.push((k.into_owned(), v.into_owned())),
            }
        }
        Ok(q)
    }

    fn path(&self, after: Option<&str>) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.rest {
            s.append_pair(k, v);
        }
        // Whole upstream pages: another client's objects on a shared key
        // are read past, so fewer round trips find this client's.
        s.append_pair("limit", &MAX_LIMIT.to_string());
        s.append_pair("order", if self.descending { "desc" } else { "asc" });
        if let Some(a) = after {
            s.append_pair("after", a);
        }
        format!("/chat/completions?{}", s.finish())
    }
}

type Key = (i64, Arc<str>);

/// Upstream pages one account is read for, at most, per list page (other
/// clients' objects on a shared key are skipped over, not returned).
const MAX_PAGES: usize = 5;

struct List<'a> {
    req: &'a HttpRequest,
    state: &'a web::Data<ProxyState>,
    client: &'a web::Data<awc::Client>,
    query: &'a ListQuery,
    who: Option<Arc<str>>,
    priority: Priority,
    created: &'a HashMap<Arc<str>, Key>,
}

impl List<'_> {
    /// This client's objects in one account after `after`: page after
    /// upstream page until there are more than a list page of them or the
    /// account has no more. `Err` is the account's failed answer.
    async fn collect(
        &self,
        account: Arc<str>,
        mut after: Option<String>,
    ) -> Result<(Vec<(Key, Value)>, bool), HttpResponse> {
        let mut got = Vec::new();
        for _ in 0..MAX_PAGES {
            let input = Input::Page {
                account: account.clone(),
                path: self.query.path(after.as_deref()),
                client: self.who.clone(),
                priority: self.priority,
            };
            let res = proxy(
                Endpoint::ChatCompletionList,
                self.req.clone(),
                input,
                self.state.clone(),
                self.client.clone(),
            )
            .await;
            if !res.status().is_success() {
                return Err(res);
            }
            let bytes = actix_web::body::to_bytes(res.into_body())
                .await
                .map_err(|_| {
                    actix_web::ResponseError::error_response(&ApiError::Internal(
                        "could not read an account's page".into(),
                    ))
                })?;
            let page: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let more = page.get("has_more") == Some(&Value::Bool(true));
            let data = page.get("data").and_then(Value::as_array).cloned();
            let data = data.unwrap_or_default();
            let last = data
                .last()
                .and_then(|v| v.get("id"))
                .and_then(Value::as_str)
                .map(str::to_string);
            for item in data {
                let key = item
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|id| self.created.get(id))
                    .cloned();
                // Another client's object on a shared key is not this client's.
                if let Some(key) = key {
                    got.push((key, item));
                }
            }
            if got.len() > self.query.limit || !more {
                return Ok((got, more));
            }
            match last {
                Some(l) => after = Some(l),
                None => return Ok((got, more)),
            }
        }
        Ok((got, true))
    }
}

pub async fn list_chat_completions(
    req: HttpRequest,
    state: web::Data<ProxyState>,
    client: web::Data<awc::Client>,
) -> Result<HttpResponse, ApiError> {
    let client_key = authenticate(&req, &state)?;
    if let Some(c) = &client_key {
        c.take()?;
    }
    let who = client_key.as_ref().map(|c| c.key.name.clone());
    let q = ListQuery::parse(req.query_string())?;
    let mine = state.affinity.objects_of(who.as_deref());
    let created: HashMap<Arc<str>, Key> = mine
        .iter()
        .map(|(id, o)| (id.clone(), (o.created_ms, id.clone())))
        .collect();
    let pivot = match &q.after {
        None => None,
        Some(after) => Some(
            created
                .get(after.as_str())
                .cloned()
                .ok_or_else(|| ApiError::ObjectNotFound(after.clone()))?,
        ),
    };
    let mut accounts: Vec<Arc<str>> = Vec::new();
    for (_, o) in &mine {
        if !accounts.contains(&o.account) {
            accounts.push(o.account.clone());
        }
    }
    let priority = client_priority(&req, client_key.as_ref())?;
    let list = List {
        req: &req,
        state: &state,
        client: &client,
        query: &q,
        who: who.clone(),
        priority,
        created: &created,
    };
    let pages = accounts.iter().map(|account| {
        let start = cursor(&mine, account, pivot.as_ref(), q.descending);
        list.collect(account.clone(), start)
    });
    let mut items: Vec<(Key, Value)> = Vec::new();
    let mut more = false;
    for got in futures_util::future::join_all(pages).await {
        match got {
            Ok((its, m)) => {
                items.extend(its);
                more |= m;
            }
            // One account failing the list fails it: a silently partial
            // list would look complete.
            Err(res) => return Ok(res),
        }
    }
    Ok(HttpResponse::Ok().json(merge(items, pivot, q.limit, q.descending, more)))
}

/// Where an account's page starts for a list continuing after `pivot`:
/// this client's object in that account nearest before it (in the list's
/// order), or the account's start when there is none.
fn cursor(
    mine: &[(Arc<str>, Owner)],
    account: &str,
    pivot: Option<&Key>,
    descending: bool,
) -> Option<String> {
    let pivot = pivot?;
    let in_account = mine.iter().filter(|(_, o)| &*o.account == account);
    let key = |(id, o): &(Arc<str>, Owner)| (o.created_ms, id.clone());
    let found = if descending {
        in_account.map(key).filter(|k| k >= pivot).min()
    } else {
        in_account.map(key).filter(|k| k <= pivot).max()
    };
    found.map(|(_, id)| id.to_string())
}

fn merge(
    mut items: Vec<(Key, Value)>,
    pivot: Option<Key>,
    limit: usize,
    descending: bool,
    more: bool,
) -> Value {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    items.dedup_by(|a, b| a.0 == b.0);
    if descending {
        items.reverse();
    }
    if let Some(p) = &pivot {
        items.retain(|(k, _)| if descending { k < p } else { k > p });
    }
    let has_more = more || items.len() > limit;
    items.truncate(limit);
    let id = |i: Option<&(Key, Value)>| i.map(|(k, _)| Value::from(&*k.1));
    json!({
        "object": "list",
        "first_id": id(items.first()),
        "last_id": id(items.last()),
        "has_more": has_more,
        "data": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(account: &str, created_ms: i64) -> Owner {
        Owner {
            account: account.into(),
            client: None,
            created_ms,
        }
    }

    #[test]
    fn each_account_continues_from_the_clients_nearest_object() {
        let mine: Vec<(Arc<str>, Owner)> = vec![
            ("a1".into(), owner("A", 1)),
            ("b1".into(), owner("B", 2)),
            ("a2".into(), owner("A", 3)),
            ("b2".into(), owner("B", 4)),
        ];
        let pivot: Key = (3, "a2".into());
        assert_eq!(
            cursor(&mine, "A", Some(&pivot), false).as_deref(),
            Some("a2")
        );
        assert_eq!(
            cursor(&mine, "B", Some(&pivot), false).as_deref(),
            Some("b1")
        );
        assert_eq!(
            cursor(&mine, "B", Some(&pivot), true).as_deref(),
            Some("b2")
        );
        assert_eq!(cursor(&mine, "A", None, false), None);
        let first: Key = (1, "a1".into());
        assert_eq!(cursor(&mine, "B", Some(&first), false), None);
    }

    #[test]
    fn pages_merge_in_order_and_say_when_more_remain() {
        let item = |id: &str| json!({ "id": id });
        let k = |ms: i64, id: &str| -> Key { (ms, id.into()) };
        let items = vec![
            (k(4, "b2"), item("b2")),
            (k(1, "a1"), item("a1")),
            (k(3, "a2"), item("a2")),
            (k(2, "b1"), item("b1")),
        ];
        let page = merge(items.clone(), None, 3, false, false);
        let ids: Vec<&str> = page["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["id"].as_str())
            .collect();
        assert_eq!(ids, ["a1", "b1", "a2"]);
        assert_eq!(page["has_more"], true);
        assert_eq!(page["last_id"], "a2");
        let rest = merge(items, Some(k(3, "a2")), 3, false, false);
        assert_eq!(rest["data"].as_array().map(Vec::len), Some(1));
        assert_eq!(rest["has_more"], false);
    }

    #[test]
    fn bad_list_parameters_are_refused() {
        assert!(ListQuery::parse("limit=0").is_err());
        assert!(ListQuery::parse("limit=101").is_err());
        assert!(ListQuery::parse("order=sideways").is_err());
        let q = ListQuery::parse("limit=5&order=desc&model=m&metadata%5Bk%5D=v").ok();
        assert!(q.is_some_and(|q| q.limit == 5 && q.descending && q.rest.len() == 2));
    }
}
