//! Stacks in SQLite (see the `Store` trait's "stacks").

use rusqlite::{Row, params};

use super::SqliteStore;
use crate::lease::signed_ms;
use crate::stacks::{STACK_COLUMNS, StackColumns, StackRecord, members_json};
use crate::{Entity, StoreError};

fn stack_row(row: &Row<'_>) -> rusqlite::Result<Result<StackRecord, StoreError>> {
    Ok(StackColumns {
        name: row.get(0)?,
        owner: row.get(1)?,
        spec: row.get(2)?,
        segment: row.get(3)?,
        state: row.get(4)?,
        members: row.get(5)?,
        created_at_ms: row.get(6)?,
        updated_at_ms: row.get(7)?,
    }
    .decode())
}

impl SqliteStore {
    pub(super) fn insert_stack_now(&self, stack: &StackRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!(
                    "INSERT INTO stacks ({STACK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    stack.name,
                    stack.owner,
                    stack.spec.to_string(),
                    stack.segment,
                    stack.state.as_str(),
                    members_json(stack),
                    signed_ms(stack.created_at_ms),
                    signed_ms(stack.updated_at_ms),
                ],
            )
            .map_err(|err| super::insert_error(err, Entity::Stack, &stack.name))?;
        Ok(())
    }

    pub(super) fn stack_now(&self, name: &str) -> Result<Option<StackRecord>, StoreError> {
        self.one(
            &format!("SELECT {STACK_COLUMNS} FROM stacks WHERE name = ?1"),
            [name],
            stack_row,
        )
    }

    pub(super) fn stacks_now(&self) -> Result<Vec<StackRecord>, StoreError> {
        self.list(
            &format!("SELECT {STACK_COLUMNS} FROM stacks ORDER BY name"),
            [],
            stack_row,
        )
    }

    pub(super) fn update_stack_now(&self, stack: &StackRecord) -> Result<(), StoreError> {
        let changed = self.execute(
            "UPDATE stacks SET spec = ?2, state = ?3, members = ?4, updated_at_ms = ?5
             WHERE name = ?1",
            params![
                stack.name,
                stack.spec.to_string(),
                stack.state.as_str(),
                members_json(stack),
                signed_ms(stack.updated_at_ms),
            ],
        )?;
        match changed {
            0 => Err(StoreError::not_found(Entity::Stack, &stack.name)),
            _ => Ok(()),
        }
    }

    pub(super) fn remove_stack_now(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM stacks WHERE name = ?1", [name])? == 1)
    }
}
