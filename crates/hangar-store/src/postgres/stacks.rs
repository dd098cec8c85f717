//! Stacks in PostgreSQL (see the `Store` trait's "stacks").

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::rows::signed;
use super::{PgStore, pg};
use crate::stacks::{STACK_COLUMNS, StackColumns, StackRecord, members_json};
use crate::{Entity, StoreError};

fn ms(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::corrupt(&value.to_string()))
}

fn stack_row(row: &Row) -> Result<StackRecord, StoreError> {
    StackColumns {
        name: row.try_get(0).map_err(pg)?,
        owner: row.try_get(1).map_err(pg)?,
        spec: row.try_get(2).map_err(pg)?,
        segment: row.try_get(3).map_err(pg)?,
        state: row.try_get(4).map_err(pg)?,
        members: row.try_get(5).map_err(pg)?,
        created_at_ms: ms(row.try_get(6).map_err(pg)?)?,
        updated_at_ms: ms(row.try_get(7).map_err(pg)?)?,
    }
    .decode()
}

impl PgStore {
    pub(super) async fn insert_stack_now(&self, stack: &StackRecord) -> Result<(), StoreError> {
        let sql =
            format!("INSERT INTO stacks ({STACK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
        let spec = stack.spec.to_string();
        let members = members_json(stack);
        let params: &[&(dyn ToSql + Sync)] = &[
            &stack.name,
            &stack.owner,
            &spec,
            &stack.segment,
            &stack.state.as_str(),
            &members,
            &signed(stack.created_at_ms),
            &signed(stack.updated_at_ms),
        ];
        self.insert(&sql, params, Entity::Stack, &stack.name).await
    }

    pub(super) async fn stack_now(&self, name: &str) -> Result<Option<StackRecord>, StoreError> {
        let sql = format!("SELECT {STACK_COLUMNS} FROM stacks WHERE name = $1");
        self.query_opt(&sql, &[&name], stack_row).await
    }

    pub(super) async fn stacks_now(&self) -> Result<Vec<StackRecord>, StoreError> {
        let sql = format!("SELECT {STACK_COLUMNS} FROM stacks ORDER BY name");
        self.query(&sql, &[], stack_row).await
    }

    pub(super) async fn update_stack_now(&self, stack: &StackRecord) -> Result<(), StoreError> {
        let changed = self
            .execute(
                "UPDATE stacks SET spec = $2, state = $3, members = $4, updated_at_ms = $5
                 WHERE name = $1",
                &[
                    &stack.name,
                    &stack.spec.to_string(),
                    &stack.state.as_str(),
                    &members_json(stack),
                    &signed(stack.updated_at_ms),
                ],
            )
            .await?;
        match changed {
            0 => Err(StoreError::not_found(Entity::Stack, &stack.name)),
            _ => Ok(()),
        }
    }

    pub(super) async fn remove_stack_now(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .execute("DELETE FROM stacks WHERE name = $1", &[&name])
            .await?
            == 1)
    }
}
